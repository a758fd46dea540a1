#!/usr/bin/env bash
# Builds the patched crates that Cargo.toml's [patch.crates-io] points at: for every crate in
# crates.tsv (name, version, sha256 of the published .crate), the published source (from cargo's
# cache, else static.crates.io), checked against its sha256, with the patches of
# proxy/patches/<name>/ applied in order, unpacked into target/patched/<name>-<version>.
# Does nothing when the patches have not changed since the last run. A patch that no longer
# applies exactly (no fuzz: every context line must match) stops here, saying which one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="$root/target/patched"
mkdir -p "$out"

while IFS=$'\t' read -r name version sum; do
	[ -n "$name" ] && [ "${name:0:1}" != "#" ] || continue
	dest="$out/$name-$version"
	patches=("$here/$name"/*.patch)
	stamp=$( { echo "$sum"; cat "${patches[@]}"; } | sha256sum | cut -d' ' -f1)
	if [ -f "$dest/.sluice-patches" ] && [ "$(cat "$dest/.sluice-patches")" = "$stamp" ]; then
		continue
	fi
	crate=""
	for c in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version.crate"; do
		[ -f "$c" ] && crate=$c && break
	done
	tmp=$(mktemp -d "$out/.tmp.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	if [ -z "$crate" ]; then
		crate="$tmp/$name-$version.crate"
		echo "downloading $name $version from crates.io (to patch it)" >&2
		curl -sSfL --retry 3 -o "$crate" "https://static.crates.io/crates/$name/$name-$version.crate" ||
			{ echo "error: cannot download $name $version from crates.io" >&2; exit 1; }
	fi
	got=$(sha256sum "$crate" | cut -d' ' -f1)
	if [ "$got" != "$sum" ]; then
		echo "error: $crate has sha256 $got, not $sum (proxy/patches/crates.tsv)" >&2
		exit 1
	fi
	tar -xzf "$crate" -C "$tmp"
	for p in "${patches[@]}"; do
		if ! patch -d "$tmp/$name-$version" -p1 --forward --batch --silent --fuzz=0 <"$p" >"$tmp/patch.log" 2>&1; then
			echo "error: $(basename "$p") no longer applies to $name $version:" >&2
			cat "$tmp/patch.log" >&2
			echo "update the patch (or drop it if upstream has the change) in proxy/patches/$name/" >&2
			exit 1
		fi
	done
	echo "$stamp" >"$tmp/$name-$version/.sluice-patches"
	rm -rf "$dest"
	mv "$tmp/$name-$version" "$dest"
	rm -rf "$tmp"
	trap - EXIT
	echo "patched $name $version (${#patches[@]} patch(es)) in target/patched/" >&2
done <"$here/crates.tsv"

#!/usr/bin/env bash
# Instructions per HTTP/1.1 keep-alive request of a proxy, counted by valgrind's callgrind
# (repeatable whatever else the machine does, unlike time): the proxy runs under callgrind twice,
# each time 200 warm-up requests and then N more (h2load --h1 -c 4); instructions per request =
# (total with N - total with 0) / N. The backend is `sluice demo-backend`.
#
#   benches/load/callgrind.sh BIN [N]            sluice (`BIN run`: rate limit, blue-green 50/50,
#                                                access log to a file, metrics)
#   CG_PROXY=bare benches/load/callgrind.sh BIN  the bare pingora proxy (`BIN bench bare-proxy`,
#                                                or BIN itself when it is bare-pingora)
#   CG_H2=1 benches/load/callgrind.sh BIN [N]    sluice, over TLS 1.3 + HTTP/2 (h2load -m 10) as in
#                                                `make bench`'s h2tls scenario (sluice only)
#
#   CG_CACHE=1 benches/load/callgrind.sh BIN [N]
#                                                also simulates the caches (32 KiB 8-way L1
#                                                instruction and data caches, a 1 MiB 16-way last
#                                                level) and prints their misses per request:
#                                                I1mr, instruction fetches that missed L1, is what
#                                                tracks time per request best here (the hot
#                                                path's code does not fit in L1)
#
#   CG_TOOL=dhat benches/load/callgrind.sh BIN [N]
#                                                allocations instead of instructions: the same two
#                                                runs under valgrind's dhat, and per call site of
#                                                the allocator, blocks per request (with N - with
#                                                0) / N, by benches/load/dhat_sites.py
#
# BIN should have symbols and no LTO (`cargo build --profile profiling`). The callgrind (or dhat) files
# stay in CG_OUT (default /tmp/sluice-callgrind) for callgrind_annotate --inclusive=yes.
set -euo pipefail
BIN=$(realpath "$1")
N=${2:-2000}
OUT=${CG_OUT:-/tmp/sluice-callgrind}
PROXY=${CG_PROXY:-sluice}
TOOL=${CG_TOOL:-callgrind}
case "$TOOL" in
callgrind) EXT=out ;;
dhat) EXT=dhat ;;
*) echo "CG_TOOL is callgrind or dhat" >&2; exit 1 ;;
esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "valgrind missing" >&2; exit 1; }
command -v h2load >/dev/null || { echo "h2load missing (make bench-deps)" >&2; exit 1; }

# shellcheck source=benches/load/configs.sh
. "$ROOT/benches/load/configs.sh"
# a proxy under valgrind takes far longer to start than the 10 s the other scripts allow
wait_port() { listening "$1" 60 || { echo "nothing listens on $1" >&2; return 1; }; }

H2=${CG_H2:-}
if [ -n "$H2" ]; then
	[ "$PROXY" = sluice ] || { echo "CG_H2 is for sluice only" >&2; exit 1; }
	"$ROOT/target/release/sluice" gen-cert --cert "$OUT/cert.pem" --key "$OUT/key.pem" \
		--hosts localhost,127.0.0.1 >/dev/null
fi

BACKEND=$(free_port)
"$ROOT/target/release/sluice" demo-backend --listen "127.0.0.1:$BACKEND" --name cg >/dev/null 2>&1 &
BPID=$!
trap 'kill $BPID 2>/dev/null || true' EXIT
wait_port "$BACKEND"

one() { # requests -> total instructions
	local n=$1 port admin conf pid
	port=$(free_port)
	admin=$(free_port)
	conf="$OUT/sluice-$n.toml"
	cat >"$conf" <<EOF
[server]
threads = 1
grace_period = "1s"
drain_delay = "0s"
access_log = "$OUT/access-$n.log"

[admin]
listen = "127.0.0.1:$admin"

[rate_limit]
requests = 1000000000
per = "1m"

$(if [ -n "$H2" ]; then printf '[tls]\nmin_version = "1.3"\n\n[[tls.cert]]\nhosts = ["localhost"]\ncert = "%s"\nkey = "%s"\n' "$OUT/cert.pem" "$OUT/key.pem"; fi)

[[listener]]
listen = "127.0.0.1:$port"
$(if [ -n "$H2" ]; then printf 'tls = true\nhttp2 = true\n'; fi)

[[pool]]
name = "blue"
backends = ["127.0.0.1:$BACKEND"]

[[pool]]
name = "green"
backends = ["127.0.0.1:$BACKEND"]

[[route]]
name = "all"
hosts = ["*"]
blue = ["blue"]
green = ["green"]
weights = { blue = 50, green = 50 }
sticky = "none"
EOF
	local cmd=("$BIN" run -c "$conf")
	if [ "$PROXY" = bare ]; then
		if "$BIN" --help 2>&1 | grep -q -- '--upstream'; then
			cmd=("$BIN" --listen "127.0.0.1:$port" --upstream "127.0.0.1:$BACKEND")
		else
			cmd=("$BIN" bench bare-proxy --listen "127.0.0.1:$port" --upstream "127.0.0.1:$BACKEND")
		fi
	fi
	local cache=()
	[ -n "${CG_CACHE:-}" ] && [ "$TOOL" = callgrind ] && cache=(--cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=1048576,16,64)
	RUST_LOG=warn valgrind --tool="$TOOL" "${cache[@]}" "--$TOOL-out-file=$OUT/$PROXY-$n.$EXT" "${cmd[@]}" \
		>"$OUT/$PROXY-$n.log" 2>&1 &
	pid=$!
	wait_port "$port"
	local load=(--h1 -c 4) url="http://127.0.0.1:$port/"
	if [ -n "$H2" ]; then
		load=(-c 4 -m 10)
		url="https://127.0.0.1:$port/"
	fi
	h2load "${load[@]}" -n 200 "$url" >/dev/null
	if [ "$n" -gt 0 ]; then
		h2load "${load[@]}" -n "$n" "$url" | grep -q "succeeded, 0 failed" ||
			{ echo "requests failed" >&2; kill "$pid"; exit 1; }
	fi
	kill -TERM "$pid"
	wait "$pid" || true
	if [ "$TOOL" = callgrind ]; then
		awk '/^summary:|^totals:/ {print $2; exit}' "$OUT/$PROXY-$n.out"
	fi
}

base=$(one 0)
full=$(one "$N")
if [ "$TOOL" = dhat ]; then
	python3 "$ROOT/benches/load/dhat_sites.py" "$OUT/$PROXY-0.dhat" "$OUT/$PROXY-$N.dhat" "$N"
	exit 0
fi
echo "$PROXY: $(( (full - base) / N )) instructions per request (totals $base with 0, $full with $N)"
if [ -n "${CG_CACHE:-}" ]; then
	# events and totals of both runs -> each event per request
	awk -v n="$N" '/^events:/ { for (i = 2; i <= NF; i++) ev[i] = $i }
		/^totals:/ { run++; for (i = 2; i <= NF; i++) t[run, i] = $i; nf = NF }
		END { line = ""; for (i = 2; i <= nf; i++) line = line sprintf(" %s %.0f", ev[i], (t[2, i] - t[1, i]) / n)
			print "per request:" line }' "$OUT/$PROXY-0.out" "$OUT/$PROXY-$N.out"
fi
echo "profile: callgrind_annotate --inclusive=yes $OUT/$PROXY-$N.out"

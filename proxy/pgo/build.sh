#!/usr/bin/env bash
# The optimised build of sluice that `make bench` measures and the container image ships: a
# profile-guided (PGO) release build. sluice's time per request goes mostly to fetching code
# (pingora's and its own request path touch more code per request than the instruction cache
# holds); the profile lets the compiler lay the hot path out together and move cold code away.
#
#   proxy/pgo/build.sh [CARGO BUILD ARGS...]       e.g. --locked
#
# 1. builds sluice instrumented (-Cprofile-generate) into target/pgo-gen;
# 2. trains it on loopback: sluice with every feature on (the benchmark's `sluice` config:
#    rate limit, geo-routing, blue-green 50/50, metrics, JSON access log) in front of
#    `sluice demo-backend`, under HTTP/1.1 keep-alive (wrk), TLS 1.3 + h2 (h2load) and new TLS
#    connections (`sluice bench handshakes`), a few seconds each; then the same config with
#    OpenTelemetry tracing on (sample ratio 0.01, spans to a demo backend as the OTLP sink)
#    under HTTP/1.1, so that a traced request path is not left out of the profile;
# 3. merges the profile with llvm-profdata (the LLVM of rustc's own version: rustup's
#    llvm-tools, or llvm-profdata-<major>, installed with apt-get as llvm-<major> when missing);
# 4. builds sluice with the profile (-Cprofile-use) into target/pgo; the binary is copied to
#    target/pgo/sluice.
#
# The same release profile (fat LTO, one codegen unit) as `cargo build --release`: only the code
# layout and the compiler's inlining and branch decisions differ. Step 4 warns that the profile
# of `sluice::main` is "partially ignored": main ends in `process::exit`, so LLVM sees no return
# path; nothing else is affected. Needs wrk and h2load
# (`make pgo-deps`). PGO_SECONDS (default 5) is the length of each training load.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
CARGO=${CARGO:-cargo}
SECS=${PGO_SECONDS:-5}
HOST=$(rustc -vV | sed -n 's/^host: //p')
LLVM=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
GEN_DIR=$ROOT/target/pgo-gen
OUT_DIR=$ROOT/target/pgo
DATA=$GEN_DIR/profiles
say() { echo "pgo: $*" >&2; }
die() {
	say "error: $*"
	exit 1
}

for t in wrk h2load; do
	command -v $t >/dev/null || die "$t is missing: the training load needs it (make pgo-deps)"
done

# llvm-profdata of rustc's LLVM version (a profile written by one version may not read in another)
profdata() {
	local c v
	for c in "$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata" "llvm-profdata-$LLVM" llvm-profdata; do
		command -v "$c" >/dev/null 2>&1 || continue
		v=$("$c" --version 2>/dev/null | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -n1)
		[ "$v" = "$LLVM" ] && { echo "$c"; return 0; }
	done
	return 1
}
PROFDATA=$(profdata) || {
	say "no llvm-profdata of LLVM $LLVM (rustc's): installing llvm-$LLVM with apt-get"
	command -v apt-get >/dev/null || die "no apt-get: install llvm-profdata of LLVM $LLVM (rustup component add llvm-tools)"
	SUDO=""
	[ "$(id -u)" = 0 ] || SUDO=sudo
	{ $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "llvm-$LLVM" >/dev/null; } ||
		die "could not install llvm-$LLVM: install llvm-profdata of LLVM $LLVM (rustup component add llvm-tools)"
	PROFDATA=$(profdata) || die "llvm-$LLVM installed, but no llvm-profdata of LLVM $LLVM found"
}

# --target: the flags go to sluice and its dependencies, not to build scripts and proc macros
build() { # target-dir rustflags args...
	local dir=$1 flags=$2
	shift 2
	RUSTFLAGS="${RUSTFLAGS:-} $flags" $CARGO build --release --target "$HOST" --target-dir "$dir" --bin sluice "$@"
}

say "1/4 instrumented build (target/pgo-gen)"
build "$GEN_DIR" "-Cprofile-generate=$DATA" "$@"
GEN=$GEN_DIR/$HOST/release/sluice

say "2/4 training"
W=$(mktemp -d /tmp/sluice-pgo.XXXXXX)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT
# free_port, listening and sluice_config: the benchmark's helpers
# shellcheck source=benches/load/configs.sh
. "$ROOT/benches/load/configs.sh"
wait_port() {
	listening "$1" || die "nothing listens on 127.0.0.1:$1: $(tail -n 5 "$W"/{backend,sink,sluice,traced}.log 2>/dev/null)"
}
rm -rf "$DATA"
# only the proxy under load writes its profile to $DATA; the helpers' go nowhere
helper() { LLVM_PROFILE_FILE="$W/helper-%p.profraw" "$GEN" "$@"; }
helper_bg() { # log command...: in the background, its own pid in PIDS (not a subshell's)
	local log=$1
	shift
	LLVM_PROFILE_FILE="$W/helper-%p.profraw" "$GEN" "$@" >"$log" 2>&1 &
	PIDS+=($!)
}
helper gen-cert --cert "$W/cert.pem" --key "$W/key.pem" --hosts localhost,127.0.0.1 >/dev/null
helper geoip-build-demo --out "$W/geo.mmdb" >/dev/null
BACKEND=$(free_port)
helper_bg "$W/backend.log" demo-backend --listen "127.0.0.1:$BACKEND" --name pgo
PLAIN=$(free_port)
TLS=$(free_port)
ADMIN=$(free_port)
sluice_config "$W" "127.0.0.1:$BACKEND" sluice "$PLAIN" "$TLS" "$ADMIN" on
SINK=$(free_port)
helper_bg "$W/sink.log" demo-backend --listen "127.0.0.1:$SINK" --name otlp-sink
TRACED=$(free_port)
TRACED_ADMIN=$(free_port)
sluice_config "$W" "127.0.0.1:$BACKEND" traced "$TRACED" - "$TRACED_ADMIN" traced "$SINK"
wait_port "$BACKEND"
wait_port "$SINK"
proxy() { # config -> the instrumented sluice's pid, writing its profile to $DATA on exit
	RUST_LOG=warn LLVM_PROFILE_FILE="$DATA/sluice-%p.profraw" "$GEN" run -c "$W/$1.toml" >"$W/$1.log" 2>&1 &
	PIDS+=($!)
	SLUICE=$!
}
stop() { # name: SIGTERM (graceful shutdown), which writes the profile
	kill -TERM "$SLUICE"
	wait "$SLUICE" || die "the instrumented sluice ($1) did not exit cleanly: $(tail -5 "$W/$1.log")"
}
proxy sluice
wait_port "$PLAIN"
wait_port "$TLS"
wrk -t1 -c64 -d"${SECS}s" "http://127.0.0.1:$PLAIN/" | sed -n 's/^Requests\/sec: */pgo:   HTTP\/1.1 req\/s /p' >&2
h2load -t1 -c64 -m10 -D "$SECS" "https://127.0.0.1:$TLS/" | sed -n 's/^requests: /pgo:   TLS h2 requests: /p' >&2
helper bench handshakes --target "127.0.0.1:$TLS" --seconds "$SECS" --concurrency 32 | sed 's/^/pgo:   handshakes /' >&2
stop sluice
proxy traced
wait_port "$TRACED"
wrk -t1 -c64 -d"${SECS}s" "http://127.0.0.1:$TRACED/" | sed -n 's/^Requests\/sec: */pgo:   HTTP\/1.1 traced req\/s /p' >&2
stop traced
[ "$(find "$DATA" -name 'sluice-*.profraw' | wc -l)" = 2 ] || die "the instrumented sluice wrote no profile to $DATA"

say "3/4 merging the profile ($PROFDATA)"
mkdir -p "$OUT_DIR"
"$PROFDATA" merge -o "$W/sluice.profdata" "$DATA"/sluice-*.profraw
# named by its content: a new profile changes RUSTFLAGS, so cargo rebuilds with it
PROFILE=$OUT_DIR/sluice-$(sha256sum "$W/sluice.profdata" | cut -c1-16).profdata
rm -f "$OUT_DIR"/sluice-*.profdata
mv "$W/sluice.profdata" "$PROFILE"

say "4/4 optimised build (target/pgo)"
build "$OUT_DIR" "-Cprofile-use=$PROFILE" "$@"
cp "$OUT_DIR/$HOST/release/sluice" "$OUT_DIR/sluice"
say "done: target/pgo/sluice"

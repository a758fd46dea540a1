#!/usr/bin/env bash
# What an HTTP/1.1 keep-alive request costs each proxy in CPU time, split into user and kernel
# time: the proxy (one worker) pinned to CPU 0, the backend (nginx, static answer) and wrk
# (64 connections) on CPU 1, as in run.sh's HTTP/1.1 scenario; per round and proxy, the
# proxy's utime and stime (/proc/PID/stat, every thread) over one wrk run divided by the
# requests wrk made. Proxies alternate within each round. Unlike req/s, this does not depend on
# whether CPU 1 keeps up.
#
#   benches/load/cpu.sh                      nginx, bare pingora, sluice (features off), sluice
#   CPU_PERF=1 benches/load/cpu.sh           also a cpu-clock profile of each proxy (perf, with
#                                            kernel symbols) in $CPU_OUT/perf-NAME.data, and its
#                                            top symbols in microseconds per request
#
# Environment: SLUICE_BIN (target/release/sluice), BARE_BIN (target/bare-pingora/release/
# bare-pingora), CPU_SECONDS (5), CPU_ROUNDS (3), CPU_PROXIES ("nginx bare sluice-off sluice"),
# CPU_OUT (/tmp/sluice-cpu). Ports 19000-19006 and 19904-19905 must be free.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$(realpath "${SLUICE_BIN:-$ROOT/target/release/sluice}")
BARE_BIN=$(realpath "${BARE_BIN:-$ROOT/target/bare-pingora/release/bare-pingora}")
SECS=${CPU_SECONDS:-5}
ROUNDS=${CPU_ROUNDS:-3}
PROXIES=${CPU_PROXIES:-nginx bare sluice-off sluice}
OUT=${CPU_OUT:-/tmp/sluice-cpu}
W=$(mktemp -d /tmp/sluice-cpu-work.XXXXXX)
mkdir -p "$OUT"
for tool in nginx wrk taskset; do
	command -v "$tool" >/dev/null || { echo "$tool missing (make bench-deps)" >&2; exit 1; }
done
[ -z "${CPU_PERF:-}" ] || command -v perf >/dev/null || { echo "perf missing (linux-perf)" >&2; exit 1; }
for port in 19000 19001 19003 19004 19005 19904 19905; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "port $port is busy" >&2; exit 1; fi
done

declare -A PORT=([nginx]=19001 [bare]=19003 [sluice-off]=19004 [sluice]=19005)
declare -A PID=()
cleanup() {
	for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
	[ -f "$W/backend.pid" ] && kill "$(cat "$W/backend.pid")" 2>/dev/null || true
	[ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
	wait 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT

# the backend and nginx as in run.sh (configs.sh); plain HTTP/1.1 only
# shellcheck source=benches/load/configs.sh
. "$ROOT/benches/load/configs.sh"
backend_config "$W" 127.0.0.1:19000
nginx_config "$W" 127.0.0.1:19000 19001 -
"$BIN" geoip-build-demo --out "$W/geo.mmdb" >/dev/null
# sluice as in run.sh: every feature on (rate limit with a high quota, geo over 2 regions,
# blue-green 50/50, metrics, JSON access log to a file), or off; plain HTTP/1.1 only
sluice_config "$W" 127.0.0.1:19000 sluice 19005 - 19905 on
sluice_config "$W" 127.0.0.1:19000 sluice-off 19004 - 19904 off

export RUST_LOG=warn
taskset -c 1 nginx -p "$W" -e "$W/backend.err" -c "$W/backend.conf" 2>/dev/null &
taskset -c 0 nginx -p "$W" -e "$W/nginx.err" -c "$W/nginx.conf" 2>/dev/null &
taskset -c 0 "$BARE_BIN" --listen 127.0.0.1:19003 --upstream 127.0.0.1:19000 >"$W/bare.log" 2>&1 &
PID[bare]=$!
taskset -c 0 "$BIN" run --config "$W/sluice-off.toml" >"$W/sluice-off.log" 2>&1 &
PID[sluice-off]=$!
taskset -c 0 "$BIN" run --config "$W/sluice.toml" >"$W/sluice.log" 2>&1 &
PID[sluice]=$!
for p in $PROXIES; do
	listening "${PORT[$p]}" || { echo "$p does not listen on ${PORT[$p]}" >&2; exit 1; }
done
[ -f "$W/nginx.pid" ] || sleep 1

pids() { # proxy -> its processes (nginx: the worker)
	if [ "$1" = nginx ]; then pgrep -P "$(cat "$W/nginx.pid")"; else echo "${PID[$1]}"; fi
}
ticks() { # proxy -> "utime stime" in clock ticks, every thread of every process
	local u=0 s=0 a b p
	for p in $(pids "$1"); do
		read -r a b < <(awk '{ print $14, $15 }' "/proc/$p/stat")
		u=$((u + a))
		s=$((s + b))
	done
	echo "$u $s"
}
HZ=$(getconf CLK_TCK)

# warm-up
for p in $PROXIES; do taskset -c 1 wrk -t1 -c64 -d1s "http://127.0.0.1:${PORT[$p]}/" >/dev/null; done
printf '%-10s %5s %9s %9s %9s %9s\n' proxy round req/s "user µs" "kernel µs" "total µs"
for r in $(seq 1 "$ROUNDS"); do
	for p in $PROXIES; do
		read -r u0 s0 < <(ticks "$p")
		out=$(taskset -c 1 wrk -t1 -c64 -d"${SECS}s" "http://127.0.0.1:${PORT[$p]}/")
		read -r u1 s1 < <(ticks "$p")
		n=$(awk '/requests in/ { print $1 }' <<<"$out")
		errs=$(awk '/Non-2xx|Socket errors/ { print }' <<<"$out")
		[ -z "$errs" ] || echo "$p: $errs" >&2
		awk -v p="$p" -v r="$r" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" -v secs="$SECS" \
			'BEGIN { printf "%-10s %5d %9.0f %9.1f %9.1f %9.1f\n", p, r, n / secs, u / hz / n * 1e6, s / hz / n * 1e6, (u + s) / hz / n * 1e6 }'
	done
done | tee "$OUT/cpu.txt"

[ -n "${CPU_PERF:-}" ] || exit 0
for p in $PROXIES; do
	list=$(pids "$p" | paste -sd,)
	(sleep 1 && perf record -q -e cpu-clock -F 4999 -g -o "$OUT/perf-$p.data" -p "$list" -- sleep 3 >/dev/null 2>&1) &
	rec=$!
	out=$(taskset -c 1 wrk -t1 -c64 -d5s "http://127.0.0.1:${PORT[$p]}/")
	wait $rec
	rps=$(awk '/Requests\/sec/ { print $2 }' <<<"$out")
	echo "== $p ($rps req/s under perf): top symbols, µs per request ([k] kernel)"
	perf report -i "$OUT/perf-$p.data" --stdio --no-children --sort sym -F sample,sym 2>/dev/null |
		awk -v rps="$rps" '/^ +[0-9]+ +\[/ { n = $1; $1 = ""; printf "%8.2f %s\n", n / 4999 / 3 / rps * 1e6, $0 }' | sort -rn | head -15 || true # head closing the pipe early is no failure
	perf report -i "$OUT/perf-$p.data" --stdio --no-children --sort dso -F sample,dso 2>/dev/null |
		awk -v rps="$rps" '/^ +[0-9]+ / { n = $1; $1 = ""; printf "%8.2f %s\n", n / 4999 / 3 / rps * 1e6, $0 }' | sort -rn | head -4 || true
done | tee "$OUT/perf.txt"

#!/usr/bin/env bash
# Applies a weight change to every ready sluice pod (each replica keeps its own admin weights)
# through the Kubernetes API: one `kubectl port-forward` per pod to its admin port, then
# PUT /routes/ROUTE/weights. Prints each pod's answer; exits 1 if any pod did not take it.
#
#   deploy/set-weights.sh [-n NAMESPACE] [-l SELECTOR] ROUTE BLUE GREEN
#
# The token comes from $SLUICE_ADMIN_TOKEN, else from the Secret sluice-admin (key admin.token).
# Weights set this way last until the ConfigMap's weights for the route change (then the file
# wins on every pod at once) - for a permanent change, edit the ConfigMap instead.
set -euo pipefail

NS=()
SELECTOR=app.kubernetes.io/name=sluice
while getopts "n:l:h" o; do
	case $o in
	n) NS=(-n "$OPTARG") ;;
	l) SELECTOR=$OPTARG ;;
	*) sed -n '2,11p' "$0"; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[ $# -eq 3 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
ROUTE=$1 BLUE=$2 GREEN=$3
[[ $BLUE =~ ^[0-9]+$ && $GREEN =~ ^[0-9]+$ ]] && [ $((BLUE + GREEN)) -eq 100 ] ||
	{ echo "weights must be whole numbers summing to 100 (got $BLUE + $GREEN)" >&2; exit 2; }
KUBECTL=${KUBECTL:-kubectl}

TOKEN=${SLUICE_ADMIN_TOKEN:-}
if [ -z "$TOKEN" ]; then
	TOKEN=$("$KUBECTL" "${NS[@]}" get secret sluice-admin -o 'jsonpath={.data.admin\.token}' | base64 -d | head -n1)
fi
[ -n "$TOKEN" ] || { echo "no admin token (set SLUICE_ADMIN_TOKEN or create Secret sluice-admin)" >&2; exit 1; }

mapfile -t PODS < <("$KUBECTL" "${NS[@]}" get pods -l "$SELECTOR" --no-headers \
	-o 'custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status' |
	awk '$2 == "True" {print $1}')
[ ${#PODS[@]} -gt 0 ] || { echo "no ready pods match $SELECTOR" >&2; exit 1; }

failed=0
for pod in "${PODS[@]}"; do
	log=$(mktemp)
	"$KUBECTL" "${NS[@]}" port-forward "pod/$pod" :9900 >"$log" 2>&1 &
	pf=$!
	port=""
	for _ in $(seq 1 100); do
		port=$(sed -nE 's/^Forwarding from 127\.0\.0\.1:([0-9]+) .*/\1/p' "$log" | head -n1)
		[ -n "$port" ] && break
		kill -0 $pf 2>/dev/null || break
		sleep 0.1
	done
	if [ -z "$port" ]; then
		echo "$pod: port-forward failed: $(tr '\n' ' ' <"$log")"
		failed=1
	else
		answer=$(curl -sS --max-time 10 -X PUT -w '\n%{http_code}' \
			-H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
			--data "{\"blue\": $BLUE, \"green\": $GREEN}" \
			"http://127.0.0.1:$port/routes/$ROUTE/weights" 2>&1) || true
		code=$(tail -n1 <<<"$answer")
		echo "$pod: $code $(sed '$d' <<<"$answer")"
		[ "$code" = 200 ] || failed=1
	fi
	kill $pf 2>/dev/null || true
	wait $pf 2>/dev/null || true
	rm -f "$log"
done
exit $failed

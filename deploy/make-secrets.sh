#!/usr/bin/env bash
# Creates or updates the two Secrets sluice needs (they are not kept in git):
#   sluice-tls    the listener certificate (kubernetes.io/tls: tls.crt, tls.key)
#   sluice-admin  the admin API bearer tokens, one per line (admin.token)
#   sluice-redis  fleet mode's Redis (url, password), with --redis-url (production overlay)
#
#   deploy/make-secrets.sh [-n NAMESPACE] [--cert FILE --key FILE] [--token TOKEN]
#                          [--redis-url URL --redis-password-file FILE]
#
# Without --cert/--key a self-signed certificate is made (for staging); without --token a random
# one is generated and printed once. Applying again replaces the Secrets in place: pods pick up
# a new certificate or token within a minute, without a restart (mounted as directories).
set -euo pipefail
NS=()
CERT="" KEY="" TOKEN="" REDIS_URL="" REDIS_PASSWORD=""
while [ $# -gt 0 ]; do
	case $1 in
	-n) NS=(-n "$2"); shift 2 ;;
	--cert) CERT=$2; shift 2 ;;
	--key) KEY=$2; shift 2 ;;
	--token) TOKEN=$2; shift 2 ;;
	--redis-url) REDIS_URL=$2; shift 2 ;;
	--redis-password-file) REDIS_PASSWORD=$2; shift 2 ;;
	*) sed -n '2,13p' "$0"; exit 2 ;;
	esac
done
KUBECTL=${KUBECTL:-kubectl}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$CERT" ]; then
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 \
		-subj /CN=sluice -addext 'subjectAltName=DNS:localhost,DNS:*.example.com' \
		-keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null
	CERT=$tmp/tls.crt KEY=$tmp/tls.key
fi
if [ -z "$TOKEN" ]; then
	TOKEN=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
	echo "admin token (keep it; it is not shown again): $TOKEN"
fi
printf '%s\n' "$TOKEN" >"$tmp/admin.token"
"$KUBECTL" "${NS[@]}" create secret tls sluice-tls --cert "$CERT" --key "$KEY" \
	--dry-run=client -o yaml | "$KUBECTL" "${NS[@]}" apply -f -
"$KUBECTL" "${NS[@]}" create secret generic sluice-admin --from-file=admin.token="$tmp/admin.token" \
	--dry-run=client -o yaml | "$KUBECTL" "${NS[@]}" apply -f -
if [ -n "$REDIS_URL" ]; then
	[ -n "$REDIS_PASSWORD" ] || { echo "--redis-url needs --redis-password-file" >&2; exit 2; }
	"$KUBECTL" "${NS[@]}" create secret generic sluice-redis --from-literal=url="$REDIS_URL" \
		--from-file=password="$REDIS_PASSWORD" --dry-run=client -o yaml | "$KUBECTL" "${NS[@]}" apply -f -
fi

# shellcheck shell=bash
# The sluice configs of the load benchmarks, sourced by run.sh and cpu.sh so that both measure
# the same "every feature on" and "features off" gateways.
#
#   sluice_config DIR BACKEND NAME PLAIN TLS ADMIN FEATURES [OTLP_PORT]
#
# writes DIR/NAME.toml: one worker; a plain HTTP/1.1 listener on 127.0.0.1:PLAIN; a TLS 1.3
# listener with h2 on 127.0.0.1:TLS, whose certificate is DIR/cert.pem + DIR/key.pem (TLS "-":
# none); the admin listener on 127.0.0.1:ADMIN; every pool's one backend at BACKEND.
# FEATURES: "on" (rate limit with a quota never reached, geo over two regions from
# DIR/geo.mmdb, blue-green 50/50 over four pools, JSON access log to DIR/NAME-access.log),
# "traced" (on, plus OpenTelemetry tracing at sample ratio 0.01 to an OTLP/HTTP sink on
# 127.0.0.1:OTLP_PORT) or "off" (one pool, no access log).
sluice_config() {
	local dir=$1 backend=$2 name=$3 plain=$4 tls=$5 admin=$6 features=$7 otlp=${8:-}
	local pools routes extra access tls_section="" tls_listener=""
	if [ "$features" != off ]; then
		access="$dir/$name-access.log"
		extra=$(
			cat <<EOT
[rate_limit]
requests = 1000000000
per = "1m"

[geoip]
database = "$dir/geo.mmdb"

[[region]]
name = "eu-west"
location = [53.34, -6.27]

[[region]]
name = "us-east"
location = [39.04, -77.49]
EOT
		)
		if [ "$features" = traced ]; then
			extra="$extra
[tracing]
otlp_endpoint = \"http://127.0.0.1:$otlp\"
sample_ratio = 0.01"
		fi
		pools=$(
			cat <<EOT
[[pool]]
name = "blue-eu"
region = "eu-west"
backends = ["$backend"]

[[pool]]
name = "blue-us"
region = "us-east"
backends = ["$backend"]

[[pool]]
name = "green-eu"
region = "eu-west"
backends = ["$backend"]

[[pool]]
name = "green-us"
region = "us-east"
backends = ["$backend"]
EOT
		)
		routes='blue = ["blue-eu", "blue-us"]
green = ["green-eu", "green-us"]
weights = { blue = 50, green = 50 }
sticky = "none"'
	else
		access=off
		extra=""
		pools="[[pool]]
name = \"blue\"
backends = [\"$backend\"]"
		routes='blue = ["blue"]'
	fi
	if [ "$tls" != - ]; then
		tls_section="
[tls]
min_version = \"1.3\"

[[tls.cert]]
hosts = [\"localhost\"]
cert = \"$dir/cert.pem\"
key = \"$dir/key.pem\"
"
		tls_listener="
[[listener]]
listen = \"127.0.0.1:$tls\"
tls = true
http2 = true
"
	fi
	cat >"$dir/$name.toml" <<EOT
[server]
threads = 1
grace_period = "1s"
drain_delay = "0s"
access_log = "$access"

[admin]
listen = "127.0.0.1:$admin"

[limits]
# the idle-connection scenario holds thousands of connections from one address
max_connections_per_ip = 0
$tls_section
[[listener]]
listen = "127.0.0.1:$plain"
http2 = false
$tls_listener
$extra

$pools

[[route]]
name = "all"
hosts = ["*"]
$routes
EOT
}

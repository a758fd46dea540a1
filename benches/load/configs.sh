# shellcheck shell=bash
# The configs and helpers of the load benchmarks, sourced by run.sh, cpu.sh, callgrind.sh and
# proxy/pgo/build.sh so that they measure the same backend, the same nginx and the same "every
# feature on" and "features off" sluice.
#
#   backend_config DIR LISTEN
#
# writes DIR/backend.conf: the backend every proxy forwards to, nginx with one worker answering
# a static 23 bytes on LISTEN (pid and error log in DIR).
#
#   nginx_config DIR BACKEND PLAIN TLS
#
# writes DIR/nginx.conf: nginx as a reverse proxy with one worker and upstream keep-alive to
# BACKEND, plain HTTP/1.1 on 127.0.0.1:PLAIN and TLS 1.3 with h2 on 127.0.0.1:TLS (certificate
# DIR/cert.pem + DIR/key.pem; TLS "-": none).
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
#
#   free_port
#
# prints a port of 127.0.0.1 that nothing listens on, for a server started right after; fails
# after 100 tries. It is one of 20000 up to the kernel's ephemeral range (ip_local_port_range,
# usually from 32768), at random: a port from that range can be taken meanwhile as the local
# port of a client connection (the load generators open thousands), and the server's bind then
# fails with "Address already in use".
#
#   listening PORT [SECONDS]
#
# waits (at most SECONDS, default 10) until something accepts connections on 127.0.0.1:PORT;
# fails if nothing does. The scripts that start these servers wait with it.
free_port() {
	local p low
	low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
	[ "${low:-0}" -gt 21000 ] || low=60000 # an unusual range: any of 20000-59999
	for _ in $(seq 1 100); do
		p=$((20000 + RANDOM % (low - 20000)))
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return 0; }
	done
	echo "no free port found" >&2
	return 1
}
listening() {
	for _ in $(seq 1 $((${2:-10} * 20))); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.05
	done
	return 1
}
backend_config() {
	cat >"$1/backend.conf" <<EOT
worker_processes 1;
daemon off;
user root;
pid $1/backend.pid;
error_log $1/backend.err warn;
events { worker_connections 20000; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen $2 reuseport backlog=4096;
        location / { return 200 "hello from the backend\n"; }
    }
}
EOT
}

nginx_config() {
	local dir=$1 tls_listen=""
	if [ "$4" != - ]; then
		tls_listen="
        listen 127.0.0.1:$4 ssl http2 backlog=4096;
        ssl_certificate $dir/cert.pem;
        ssl_certificate_key $dir/key.pem;
        ssl_protocols TLSv1.3;
        ssl_session_tickets off;
        http2_max_concurrent_streams 128;"
	fi
	cat >"$dir/nginx.conf" <<EOT
worker_processes 1;
daemon off;
user root;
pid $dir/nginx.pid;
error_log $dir/nginx.err warn;
worker_rlimit_nofile 19000;
events { worker_connections 15000; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    # the idle upstream pool sluice and the bare pingora proxy keep per worker
    upstream backend { server $2; keepalive 1024; }
    server {
        listen 127.0.0.1:$3 backlog=4096;$tls_listen
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOT
}

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
		# two colors, each with a pool in each region (the trailing blank line goes with $(...))
		pools=$(
			for p in blue-eu:eu-west blue-us:us-east green-eu:eu-west green-us:us-east; do
				printf '[[pool]]\nname = "%s"\nregion = "%s"\nbackends = ["%s"]\n\n' \
					"${p%%:*}" "${p#*:}" "$backend"
			done
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

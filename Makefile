# sluice — `make run` starts the demo, `make test` runs every test (what CI runs).
SHELL := /bin/bash
CARGO ?= cargo
# `make run` uses the optimised build; PROFILE=dev reuses the test build (faster to compile).
PROFILE ?= release
TARGET_DIR := target/$(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
BIN := $(TARGET_DIR)/sluice
CONFIG ?= config/sluice.toml

.PHONY: run test test-deps deps build pgo pgo-deps check-config bench bench-cpu bench-deps bench-micro image fmt lint clean

# Install what the build needs when it is missing (cmake for pingora's zlib-ng; patch and curl
# for the pingora patches), then build the patched pingora sources (proxy/patches/).
deps:
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found; install the Rust toolchain (https://rustup.rs)"; exit 1; }
	@missing=""; \
	for t in cmake:cmake patch:patch curl:curl; do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (the build needs it) with apt-get"; \
	  if ! command -v apt-get >/dev/null; then echo "error: no apt-get here: install$$missing with your package manager"; exit 1; fi; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null \
	    || { echo "error: could not install$$missing; install it by hand"; exit 1; }; \
	fi
	@proxy/patches/apply.sh

# With PROFILE=dev, build the way `cargo test` does (dev-dependencies change the feature set of
# shared crates), so that `make test` and `make run PROFILE=dev` reuse one build.
BUILD_FLAGS := $(if $(filter dev,$(PROFILE)),--all-targets,--bin sluice)

build: deps
	$(CARGO) build --profile $(PROFILE) $(BUILD_FLAGS)

# The demo: a dev certificate, blue demo backends on 127.0.0.1:9001/9002, a green one on 9003,
# and the gateway on https://localhost:8443 (h2 + http/1.1), http://localhost:8080 (h1 + h2c),
# admin 127.0.0.1:9900 (its token in state/admin.token). Ctrl-C stops everything.
run: build
	@$(BIN) gen-cert --cert certs/dev.crt --key certs/dev.key
	@[ -f geoip/demo-city.mmdb ] || $(BIN) geoip-build-demo --out geoip/demo-city.mmdb
	@mkdir -p state && [ -s state/admin.token ] || \
	  (umask 077; od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > state/admin.token; echo >> state/admin.token)
	@set -m; pids=(); \
	trap 'kill $${pids[@]} 2>/dev/null; wait 2>/dev/null' EXIT; \
	$(BIN) demo-backend --listen 127.0.0.1:9001 --name backend-1 & pids+=($$!); \
	$(BIN) demo-backend --listen 127.0.0.1:9002 --name backend-2 & pids+=($$!); \
	$(BIN) demo-backend --listen 127.0.0.1:9003 --name green-1 & pids+=($$!); \
	echo "sluice demo: curl -k https://localhost:8443/   (status page: http://127.0.0.1:9900/, admin: curl http://127.0.0.1:9900/status)"; \
	echo "shift to green: curl -X POST -H \"Authorization: Bearer \$$(cat state/admin.token)\" \
	  127.0.0.1:9900/routes/shop/shift -d '{\"to\": \"green\", \"step\": 20, \"every\": \"5s\"}'"; \
	$(BIN) run -c $(CONFIG) & pids+=($$!); \
	trap 'kill -TERM $${pids[3]} 2>/dev/null; wait $${pids[3]} 2>/dev/null; kill $${pids[@]} 2>/dev/null; wait 2>/dev/null' INT TERM EXIT; \
	wait $${pids[3]}

# Real servers the tests start on loopback ports, installed with apt when missing: redis-server,
# redis-sentinel and redis-cli (fleet mode, tests/cluster.rs), chromium (the status page,
# tests/status_page.rs), promtool from prometheus (alert and dashboard tests, tests/monitoring.rs),
# dnsmasq (DNS
# discovery, tests/discovery.rs). kubectl renders deploy/ in tests/deploy.rs (skipped without it).
TEST_TOOLS := dnsmasq:dnsmasq-base redis-server:redis-server redis-sentinel:redis-sentinel redis-cli:redis-tools chromium:chromium promtool:prometheus
test-deps:
	@missing=""; \
	for t in $(TEST_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (the tests start it)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
	    || { echo "error: could not install$$missing, which the tests need: install it by hand"; exit 1; }; \
	fi
	@if ! command -v kubectl >/dev/null && command -v apt-get >/dev/null; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  echo "installing kubectl (for tests/deploy.rs)"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq kubectl >/dev/null; } 2>/dev/null \
	    || echo "note: kubectl is not installable here; tests/deploy.rs will skip"; \
	fi

test: deps test-deps
	$(CARGO) test --all-targets
	@command -v kubectl >/dev/null || echo "note: tests/deploy.rs was SKIPPED (no kubectl)"
	@docker info >/dev/null 2>&1 || echo "note: tests/container.rs was SKIPPED (no Docker daemon)"

# The container image (multi-stage Dockerfile; needs its base images from a registry).
image:
	docker build -t sluice:$$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1) -t sluice:latest .

# Installs the missing packages of a list of command:package pairs with apt-get.
define apt_install
@missing=""; \
for t in $(1); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
if [ -n "$$missing" ]; then \
  echo "installing$$missing ($(2))"; \
  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
    || { echo "error: could not install$$missing ($(2)): install it by hand"; exit 1; }; \
fi
endef

# The profile-guided build's training load (proxy/pgo/build.sh installs llvm-profdata itself).
pgo-deps: deps
	$(call apt_install,wrk:wrk h2load:nghttp2-client,the PGO training load)

# The load tools `make bench` compares sluice with (Debian packages).
bench-deps: pgo-deps
	$(call apt_install,nginx:nginx haproxy:haproxy curl:curl taskset:util-linux strace:strace gcc:gcc,the benchmark)

# Side-by-side load benchmark: sluice, a bare pingora proxy, nginx and HAProxy on this machine
# (benches/load/run.sh); the table goes to benches/results/. Not part of `make test`.
# `bare` is the same bare proxy built against pingora as published (benches/load/bare, its own
# workspace, without our patches); the `profiling` builds with the system allocator count
# allocations per request (benches/load/alloc_count.c).
# `sluice` in the tables is the build sluice ships, profile-guided (`make pgo`); `sluice-nopgo`
# is the plain release build of the same source.
BARE_CARGO := cd benches/load/bare && $(CARGO) build --target-dir ../../../target/bare-pingora
bench: bench-deps
	$(CARGO) build --release --bin sluice
	CARGO=$(CARGO) proxy/pgo/build.sh
	$(CARGO) build --profile profiling --features system-alloc --bin sluice
	cp target/profiling/sluice target/profiling/sluice-system-alloc
	$(BARE_CARGO) --release
	$(BARE_CARGO) --profile profiling --features system-alloc
	SLUICE_BIN=target/pgo/sluice SLUICE_NOPGO_BIN=target/release/sluice \
	  BARE_BIN=target/bare-pingora/release/bare-pingora SLUICE_COUNT_BIN=target/profiling/sluice-system-alloc \
	  BARE_COUNT_BIN=target/bare-pingora/profiling/bare-pingora benches/load/run.sh

# CPU time per HTTP/1.1 request, user and kernel, of nginx, bare pingora and sluice (the PGO
# build; CPU_PERF=1: with a cpu-clock profile of each).
bench-cpu: bench-deps
	CARGO=$(CARGO) proxy/pgo/build.sh
	$(BARE_CARGO) --release
	SLUICE_BIN=target/pgo/sluice benches/load/cpu.sh

# The optimised build the image ships and `make bench` measures: a profile-guided release build,
# trained on loopback with the benchmark's load (proxy/pgo/build.sh; needs wrk and h2load, and
# installs llvm-<major> matching rustc's LLVM when its llvm-profdata is missing) -> target/pgo/sluice.
pgo: pgo-deps
	CARGO=$(CARGO) proxy/pgo/build.sh

# Micro-benchmarks (criterion) and the rate limiter's memory with 1,000,000 clients.
bench-micro: deps
	$(CARGO) bench --bench decisions --bench limiter --bench limiter_memory --bench geo

check-config: build
	$(BIN) check -c $(CONFIG)

fmt:
	$(CARGO) fmt

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean

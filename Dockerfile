# syntax=docker/dockerfile:1
# sluice: multi-stage build. The runtime image is distroless (glibc, CA roots, no shell), runs as
# a non-root user and works with a read-only root filesystem (writes only to /var/lib/sluice).
#
#   docker build -t sluice .
#   docker run -p 8443:8443 -p 8080:8080 -v $PWD/myconfig:/etc/sluice:ro sluice

FROM rust:1.95-bookworm AS build
# SLUICE_PGO=1 (the default): the profile-guided build (proxy/pgo/build.sh), trained on loopback
# with wrk and h2load during the build; it installs llvm-<rustc's LLVM major> for llvm-profdata.
# SLUICE_PGO=0: the plain release build (faster to build, slower to run).
ARG SLUICE_PGO=1
RUN apt-get update && apt-get install -y --no-install-recommends cmake patch \
    $(if [ "$SLUICE_PGO" = 1 ]; then echo wrk nghttp2-client; fi) \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies are fetched in their own layer (changes only with Cargo.toml / Cargo.lock), and
# compiled into a cache mount that outlives the layer: a source-only change rebuilds sluice, not
# pingora and the rest.
# The pingora patches (proxy/patches/) are applied to the published sources in that layer too:
# Cargo.toml points [patch.crates-io] at target/patched/.
COPY Cargo.toml Cargo.lock ./
COPY benches benches
COPY proxy/patches proxy/patches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    proxy/patches/apply.sh \
    && echo 'fn main() {}' > proxy/main.rs && touch proxy/lib.rs \
    && cargo fetch --locked && rm proxy/main.rs proxy/lib.rs
COPY proxy proxy
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target/release \
    --mount=type=cache,target=/src/target/pgo-gen \
    --mount=type=cache,target=/src/target/pgo \
    if [ "$SLUICE_PGO" = 1 ]; then \
      proxy/pgo/build.sh --locked && install -D target/pgo/sluice /out/usr/local/bin/sluice; \
    else \
      cargo build --release --locked --bin sluice && install -D target/release/sluice /out/usr/local/bin/sluice; \
    fi \
    && mkdir -p /out/var/lib/sluice /out/etc/sluice

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/sluice /usr/local/bin/sluice
COPY --from=build --chown=65532:65532 /out/var/lib/sluice /var/lib/sluice
# the Kubernetes config; mount your own directory over /etc/sluice (it is watched and reloaded)
COPY deploy/base/config/sluice.toml /etc/sluice/sluice.toml
ENV RUST_LOG=info \
    MIMALLOC_PURGE_DELAY=0
USER 65532:65532
EXPOSE 8443 8080 9900
VOLUME ["/var/lib/sluice"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/sluice", "probe", "127.0.0.1:9900", "/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run", "-c", "/etc/sluice/sluice.toml"]

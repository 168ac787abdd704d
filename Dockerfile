# syntax=docker/dockerfile:1
# Gateway container image: `make image` (docker build -t gateway:dev .).
#
# Stage 1 compiles the release binary with the `kube` feature. Dependencies are built in
# their own layer from the manifests and lockfile alone (with stub sources), so editing
# the gateway's code rebuilds only the workspace crates.
# Stage 2 is distroless (glibc, CA certificates, no shell), runs as uid 10001 and writes
# nothing to disk, so it works with readOnlyRootFilesystem.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

# 1. Dependencies only: manifests, lockfile and empty stand-ins for every workspace target.
COPY Cargo.toml Cargo.lock ./
COPY gateway/Cargo.toml gateway/Cargo.toml
COPY shared/Cargo.toml shared/Cargo.toml
COPY loadtest/Cargo.toml loadtest/Cargo.toml
RUN mkdir -p gateway/src shared/src loadtest/src \
 && touch gateway/src/lib.rs shared/src/lib.rs loadtest/src/lib.rs \
 && echo 'fn main() {}' > gateway/src/main.rs \
 && echo 'fn main() {}' > loadtest/src/main.rs \
 && cargo build --release --locked -p gateway --features kube,otlp \
 && rm -rf gateway/src shared/src loadtest/src

# 2. The real sources. COPY keeps the context's mtimes, which can be older than the stub
#    build above, so touch them to make cargo rebuild the workspace crates.
COPY . .
RUN find gateway shared loadtest -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p gateway --features kube,otlp \
 && install -D -m 0755 target/release/gateway /out/gateway \
 && /out/gateway --version

FROM gcr.io/distroless/cc-debian12:nonroot
# `sleep` for the Helm chart's exec preStop hook (distroless has no shell or coreutils);
# it needs only glibc, which this base image provides.
COPY --from=builder /usr/bin/sleep /bin/sleep
COPY --from=builder /out/gateway /usr/local/bin/gateway
# Listen on all interfaces inside the container; the admin port must still never be
# published beyond the cluster (the Helm chart exposes it on an internal Service only).
ENV GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:9090 \
    GATEWAY_LOG_FORMAT=json
EXPOSE 8080 9090
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/gateway"]

# syntax=docker/dockerfile:1
# Tally: `docker build -t tally:0.1.0 .` (BuildKit, the default builder since Docker 23).
# The binary links glibc only (rustls, no OpenSSL), so it runs on distroless cc.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Everything the crate needs to build: manifest and lockfile, build script and protos
# (compiled by protox, no protoc), migrations (embedded by sqlx::migrate!), sources.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY migrations ./migrations
COPY src ./src
# Cache mounts keep the registry and target/ between builds; the binary is copied out of the
# cached target/ in the same step, without its line tables (`strip --strip-debug`: symbols stay,
# so a backtrace still names functions): 49 MiB instead of 237 MiB.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tally \
    && install -d /out \
    && strip --strip-debug -o /out/tally target/release/tally \
    && chmod 0755 /out/tally \
    && install -d -m 0750 -o 65532 -g 65532 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/tally /usr/local/bin/tally
COPY --from=builder --chown=65532:65532 /out/data /data
USER 65532:65532
WORKDIR /data
ENV TALLY_LISTEN=0.0.0.0:50051 \
    TALLY_HTTP_LISTEN=0.0.0.0:8080 \
    TALLY_METRICS_LISTEN=0.0.0.0:9090 \
    TALLY_DATABASE_URL=sqlite:///data/tally.db
VOLUME ["/data"]
# 50051 gRPC, 8080 HTTP (Stripe webhooks, billing), 9090 metrics and health.
EXPOSE 50051 8080 9090
ENTRYPOINT ["/usr/local/bin/tally"]
CMD ["serve"]

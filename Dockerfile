# fikra-ratelimit: a release build on Debian, run as a non-root user on a
# distroless base (glibc and CA certificates, no shell).
#   docker build -t fikra-ratelimit:0.1.0 .
# tests/deploy.rs checks that this build command is the one the project
# tests, and that the runtime stage runs the binary it builds.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin fikra-ratelimit

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/fikra-ratelimit /usr/local/bin/fikra-ratelimit
COPY deploy/config/fikra.yaml /etc/fikra/config/fikra.yaml
ENV FIKRA_CONFIG=/etc/fikra/config \
    FIKRA_LISTEN=0.0.0.0:8081 \
    FIKRA_METRICS_LISTEN=0.0.0.0:9102 \
    FIKRA_LOG_FORMAT=json
EXPOSE 8081 9102
# 65532 is distroless's nonroot user.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/fikra-ratelimit"]
CMD ["serve"]

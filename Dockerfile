# syntax=docker/dockerfile:1
# Images of the two binaries, one target each (BuildKit):
#   docker build --target operator -t bulwark-operator:dev .
#   docker build --target sidecar  -t bulwark-sidecar:dev .
# Both run as the distroless nonroot user (65532), as the chart expects. The sidecar image has
# no ONNX Runtime and no models: the model-based scanners need them mounted (--onnxruntime,
# --models-dir).

ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p bulwark-operator -p bulwark-sidecar \
    && mkdir -p /out \
    && cp target/release/bulwark-operator target/release/bulwark-sidecar /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/bulwark-operator /usr/local/bin/bulwark-operator
USER 65532:65532
# config stream, metrics and health
EXPOSE 15010 8080
ENTRYPOINT ["/usr/local/bin/bulwark-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build /out/bulwark-sidecar /usr/local/bin/bulwark-sidecar
USER 65532:65532
# LLM API listener, admin (/metrics /ready /live /config)
EXPOSE 15080 15090
ENTRYPOINT ["/usr/local/bin/bulwark-sidecar"]

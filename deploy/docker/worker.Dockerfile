# The GPU worker image: loractl-worker, the CPU build of loractl (CPU ranks) and the CUDA build
# (`loractl-cuda`, GPU ranks: the worker's gpu_rank_command) on NVIDIA's CUDA 13 runtime base.
#   docker build -f deploy/docker/worker.Dockerfile -t ghcr.io/OWNER/loractl-worker:0.1.0 .
#   (--build-arg CUDA_COMPUTE_CAP=80 for A100s; 90 is H100/H200)
# The CUDA build uses CUDA 13.0 and NCCL 2.30 from PyPI and a link stub of libcuda
# (scripts/cuda/build.sh); at run time the driver's libcuda comes from the NVIDIA container
# runtime, cuBLAS/cuRAND/NVRTC from the base image, NCCL from the libnccl2 package.
FROM rust:1.88-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN bash -c 'source scripts/env.sh && cargo build --release --locked -p loractl-worker -p loractl' \
    && strip target/release/loractl-worker target/release/loractl
ARG CUDA_COMPUTE_CAP=90
RUN bash -c 'source scripts/env.sh && CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP \
    LORACTL_CUDA_CACHE=/cuda LORACTL_CUDA_OUT=/out/loractl-cuda scripts/cuda/build.sh'

FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libnccl2 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 loractl \
    && useradd --system --uid 10001 --gid loractl --home-dir /var/lib/loractl-worker loractl
COPY --from=build /src/target/release/loractl-worker /src/target/release/loractl /usr/local/bin/
COPY --from=build /out/loractl-cuda /usr/local/bin/loractl-cuda
USER 10001:10001
EXPOSE 9465
ENTRYPOINT ["/usr/local/bin/loractl-worker"]
CMD ["--config=/etc/loractl/worker.toml"]

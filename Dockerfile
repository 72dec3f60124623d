# syntax=docker/dockerfile:1
# cellsam-stream service image: CUDA PyTorch, Ray Serve and this package, run as a non-root user.
#
#   docker build -t ghcr.io/cellsam-stream/cellsam-stream:0.1.0 .
#
# One image for every role (docs/deploy.md):
#   - KubeRay head and GPU workers (deploy/kuberay/rayservice.yaml): KubeRay replaces the entrypoint with
#     its own `ray start ...` command, run by bash, and probes the node with wget -- both are installed;
#   - a single machine: docker run --gpus all -p 5555:5555 -p 5556:5556 -p 8000:8000 -p 9464:9464 \
#       -v /data/output:/data/output -v /etc/cellsam:/etc/cellsam:ro IMAGE serve --config /data/service.yaml
#     (inside a container the service must bind beyond its loopback to be reachable: security.expose,
#     with CURVE keys and an HTTP token, docs/deploy.md "Securing the endpoints")
#   - the weights init container: IMAGE weights fetch --cache-dir /models
#
# The base image brings a CUDA build of torch; installing the package keeps it (torch>=2.4 is already
# satisfied), so nothing pulls a CPU wheel over it. RAY_VERSION must equal `rayVersion` in the RayService
# and the Ray version of every node of a plain `ray start` cluster.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends bash ca-certificates wget \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cellsam-stream
COPY pyproject.toml README.md ./
COPY cellsam_core ./cellsam_core
COPY acquisition ./acquisition
COPY serving ./serving
COPY deploy ./deploy
RUN python -m pip install "ray[default,serve]==${RAY_VERSION}" . \
    && rm -rf build ./*.egg-info \
    && python -c "import torch, ray, cellsam_core, acquisition, serving; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" \
    && cellsam-stream --version

# uid 1000 matches runAsUser/fsGroup in the RayService; some base images already have a user with it.
RUN if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash cellsam \
    && mkdir -p /data/output /models \
    && chown cellsam:cellsam /data/output /models
USER 1000
WORKDIR /home/cellsam

# 5555 ZeroMQ ingest (PULL), 5556 ZeroMQ results (PUB), 8000 Serve HTTP (/healthz, /acquisitions,
# /segment), 9464 Prometheus /metrics; Ray's own: 6379 GCS, 8265 dashboard, 10001 client, 8080 metrics.
EXPOSE 5555 5556 8000 9464 6379 8265 10001 8080

ENTRYPOINT ["cellsam-stream"]
CMD ["--help"]

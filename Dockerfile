# syntax=docker/dockerfile:1
#
# U-Net segmentation service. Two images from this one file:
#
#   docker build --target gpu -t unet-segmentation-service:gpu .   # default (last stage)
#   docker build --target cpu -t unet-segmentation-service:cpu .
#   docker build --target ray -t unet-segmentation-service:ray .   # gpu + Ray Serve (scale extra)
#
# Base image and CUDA, deliberately: python:3.11-slim plus onnxruntime-gpu's [cuda,cudnn]
# extras, NOT an nvidia/cuda base. onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9, and
# those extras install exactly the CUDA/cuDNN libraries it was built against as pip wheels, at
# versions pip resolves together with it. An nvidia/cuda:*-cudnn-runtime base would carry a
# second, independently versioned copy of the same libraries (GBs larger), could drift from what
# onnxruntime-gpu expects, and would still need Python on top. The host needs only a recent
# NVIDIA driver (CUDA 13: R580 or newer) and the NVIDIA Container Toolkit, which injects the
# driver's libcuda into the container. The CPU image is the same minus every NVIDIA wheel.
#
# The runtime stages hold the venv and the models: no TensorFlow (the `train` extra is never
# installed), no compilers, no pip cache, no source tree beyond the installed package.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: the service as a wheel, and the pins, for the final stages to install from. They
# install their venv themselves, with this stage bind-mounted (RUN --mount, BuildKit's or
# buildah's), instead of copying a venv built here: the gpu venv is 2.9 GB, and writing it once
# as this stage's layer and again as a COPY took 37 of the gpu image's 121 s build (podman,
# tests/test_containers.py). Every dependency ships as a binary wheel: no compiler anywhere.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The pins: the same constraints.txt that CI installs and tests (make lock), so a green CI
# means the images' Python environments were tested.
COPY constraints.txt pyproject.toml README.md ./
# Only the service package: training/ needs TensorFlow and stays out (its `segtrain` entry point
# is installed but unusable in the image, by design).
COPY service/ service/
RUN pip wheel --no-cache-dir --no-deps -c constraints.txt --wheel-dir /src/dist .

# ---------------------------------------------------------------------------------------------
# runtime: what both images share.
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="unet-segmentation-service" \
      org.opencontainers.image.description="U-Net segmentation over HTTP (FastAPI + ONNX Runtime)" \
      org.opencontainers.image.licenses="BSD-3-Clause"
# A fixed, unprivileged UID/GID (USER is numeric so that "runAsNonRoot"-style checks can verify
# it without /etc/passwd); -l: no lastlog/faillog growth.
RUN groupadd --system --gid 10001 seg \
 && useradd --system --uid 10001 --gid 10001 --no-create-home -l --shell /usr/sbin/nologin seg
# ORT_DISABLE_TELEMETRY: onnxruntime (1.31) otherwise keeps a telemetry device ID and event
# queue under $XDG_CACHE_HOME or ~/.cache; on the read-only root that write fails, with a warning
# at every start. tests/test_containers.py checks that nothing is written outside /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    SEG_MODEL_DIR=/models \
    SEG_HOST=0.0.0.0 \
    SEG_PORT=8000
# No VOLUME for /models on purpose: an anonymous volume is created from the image once and then
# reused by `docker compose up` across image upgrades, silently serving stale models. The models
# are baked in; to serve others, bind-mount a folder over /models (see docker-compose.yml).
# An empty, root-owned working directory (pydantic-settings would read a .env from here).
WORKDIR /srv
EXPOSE 8000
# Liveness, from inside the container (no curl in slim images). Readiness (/readyz: models
# loaded and warm) is for load balancers and for Prometheus (segment_models_ready).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SEG_PORT', '8000'), timeout=4)"]
# Exec form: uvicorn is PID 1 and receives SIGTERM itself; it stops accepting connections and
# lets requests in flight finish (up to 60 s; compose's stop_grace_period allows for that).
ENTRYPOINT ["segment-service"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS cpu
# The venv, from the builder's wheel and pins (mounted for this step only, so neither stays).
RUN --mount=type=bind,from=builder,source=/src,target=/src \
    python -m venv /opt/venv \
 && set -- /src/dist/*.whl \
 && pip install --no-cache-dir --disable-pip-version-check -c /src/constraints.txt "$1[cpu]" \
 && pip check
ENV SEG_PROVIDERS='["CPUExecutionProvider"]'
# Models last: they change more often than the dependencies. Owned by root, readable by all:
# the service never writes to them.
COPY models/ /models/
USER 10001:10001

# ---------------------------------------------------------------------------------------------
# ray: the gpu image plus Ray Serve (the `scale` extra) and deploy/ray/serve.yaml, for a
# multi-GPU node (`docker run --gpus all -p 8000:8000 unet-segmentation-service:ray`: a local
# Ray with the Serve application) and for Ray clusters on Kubernetes, where KubeRay replaces
# the entrypoint with `ray start` (deploy/kubernetes/rayservice.yaml). Not built in CI.
FROM runtime AS ray
ARG ORT_VERSION=1.31.1
RUN --mount=type=bind,from=builder,source=/src,target=/src \
    python -m venv /opt/venv \
 && set -- /src/dist/*.whl \
 && pip install --no-cache-dir --disable-pip-version-check -c /src/constraints.txt \
      "$1[gpu,scale]" "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}" \
 && pip check \
 && if pip show onnxruntime >/dev/null 2>&1; then echo "onnxruntime (CPU) must not be installed beside onnxruntime-gpu" >&2; exit 1; fi
# The same library set-up and check as the gpu stage below.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN find /opt/venv/lib/python3.11/site-packages/nvidia -name 'lib*.so*' -printf '%h\n' \
      | sort -u > /etc/ld.so.conf.d/zz-nvidia-wheels.conf \
 && ldconfig \
 && provider="$(find /opt/venv/lib/python3.11/site-packages/onnxruntime -name 'libonnxruntime_providers_cuda.so')" \
 && test -n "$provider" \
 && missing="$(ldd "$provider" | grep 'not found' | grep -v 'libcuda\.so' || true)" \
 && if [ -n "$missing" ]; then echo "CUDA provider cannot load: $missing" >&2; exit 1; fi
# HOME: Ray keeps a little state under ~ (the image's user has no home directory).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SEG_PROVIDERS='["CUDAExecutionProvider","CPUExecutionProvider"]' \
    HOME=/tmp
COPY deploy/ray/serve.yaml /srv/serve.yaml
COPY models/ /models/
USER 10001:10001
# Ray's dashboard (8265) and metrics (8080) besides the service's port.
EXPOSE 8265 8080
ENTRYPOINT ["serve", "run", "/srv/serve.yaml"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS gpu
# constraints.txt pins onnxruntime (the CPU build CI runs) but cannot hold onnxruntime-gpu or its
# nvidia-* wheels: installing both onnxruntime packages in one environment breaks it. So the GPU
# build is pinned here to the SAME version as onnxruntime in constraints.txt; tests/test_deploy.py
# fails when the two disagree. The nvidia-* wheels are resolved by onnxruntime-gpu's own
# [cuda,cudnn] requirements.
ARG ORT_VERSION=1.31.1
RUN --mount=type=bind,from=builder,source=/src,target=/src \
    python -m venv /opt/venv \
 && set -- /src/dist/*.whl \
 && pip install --no-cache-dir --disable-pip-version-check -c /src/constraints.txt \
      "$1[gpu]" "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}" \
 && pip check \
 && if pip show onnxruntime >/dev/null 2>&1; then echo "onnxruntime (CPU) must not be installed beside onnxruntime-gpu" >&2; exit 1; fi
# Let the dynamic linker find the CUDA/cuDNN libraries from the nvidia-* wheels however
# onnxruntime loads them, then fail the build if its CUDA provider still has an unresolved
# library: that would otherwise surface only at run time, as a silent fallback to the CPU.
# libcuda.so.1 is the exception: the driver's, injected by the NVIDIA Container Toolkit.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN find /opt/venv/lib/python3.11/site-packages/nvidia -name 'lib*.so*' -printf '%h\n' \
      | sort -u > /etc/ld.so.conf.d/zz-nvidia-wheels.conf \
 && ldconfig \
 && provider="$(find /opt/venv/lib/python3.11/site-packages/onnxruntime -name 'libonnxruntime_providers_cuda.so')" \
 && test -n "$provider" \
 && missing="$(ldd "$provider" | grep 'not found' | grep -v 'libcuda\.so' || true)" \
 && if [ -n "$missing" ]; then echo "CUDA provider cannot load: $missing" >&2; exit 1; fi
# Ask the toolkit for the GPU's compute libraries (and nvidia-smi, handy for debugging).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SEG_PROVIDERS='["CUDAExecutionProvider","CPUExecutionProvider"]'
COPY models/ /models/
USER 10001:10001

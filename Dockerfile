# fedsim image. CPU by default; a CUDA build of torch with --build-arg VARIANT=cuda.
#   docker build -t fedsim .                         (CPU, torch 2.13.0 CPU wheel)
#   docker build -t fedsim:cuda --build-arg VARIANT=cuda .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 FLWR_TELEMETRY_ENABLED=0 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends git procps && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# torch first, from the index that matches the variant, so the project's torch range installs nothing more.
RUN if [ "$VARIANT" = "cuda" ]; then \
      pip install "torch==${TORCH_VERSION}"; \
    else \
      pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    fi
COPY pyproject.toml README.md ./
COPY fedsim ./fedsim
COPY strategies ./strategies
COPY experiments ./experiments
RUN pip install -e .
ENTRYPOINT []
CMD ["fedsim", "--help"]

# One image for every personabot part; compose.yaml picks the command.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PERSONABOT_DATA_DIR=/data \
    MODELSCOPE_CACHE=/models HF_HOME=/models/hf
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# CUDA build of torch from PyPI (runs on the NVIDIA container runtime); override for CPU images.
ARG TORCH_SPEC="torch>=2.6,<2.14"
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY personabot personabot
COPY core core
COPY training training
COPY workers workers
COPY bot bot
COPY ui ui
RUN pip install .
RUN useradd --create-home --uid 1000 personabot && mkdir -p /data /models && chown personabot /data /models
USER personabot
VOLUME ["/data", "/models"]
ENTRYPOINT ["personabot"]
CMD ["--help"]

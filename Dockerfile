# modelpress image: API, workers and the one-shot migration all run from it.
#
#   docker build -t modelpress .                                  # CPU (torch==2.13.0 CPU build)
#   docker build -t modelpress-gpu --build-arg TORCH_VARIANT=cu128 .   # GPU worker (CUDA build)
#
# The CUDA build of torch bundles the CUDA runtime libraries, so the same slim Python base serves
# the GPU worker; the host needs the NVIDIA driver and the NVIDIA container toolkit
# (docker-compose.yml reserves the GPU with deploy.resources.reservations.devices).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# "cpu" for the CPU image, a CUDA tag such as "cu128" for the GPU worker
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODELPRESS_HOME=/var/lib/modelpress \
    TOKENIZERS_PARALLELISM=false

RUN useradd --create-home --uid 1000 modelpress \
    && mkdir -p /var/lib/modelpress && chown modelpress /var/lib/modelpress

WORKDIR /app
# torch first, pinned, from the index of the wanted build (a loose requirement would pull the
# multi-GB CUDA build into the CPU image)
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md ./
COPY modelpress ./modelpress
COPY api ./api
COPY workers ./workers
COPY compression ./compression
COPY domain ./domain
COPY migrations ./migrations
RUN pip install .

USER modelpress
VOLUME ["/var/lib/modelpress"]
EXPOSE 8000
CMD ["modelpress", "api", "--host", "0.0.0.0", "--port", "8000"]

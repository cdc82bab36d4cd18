# sygil-bot on a CUDA GPU. Build: docker build -t sygil-bot .
# Run:  docker run --gpus all -e DISCORD_TOKEN=... -v sygil-data:/data sygil-bot
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf-cache

RUN useradd --create-home --uid 1000 sygil && mkdir -p /data && chown sygil /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY cogs ./cogs
# The base image's CUDA torch satisfies the project's torch requirement, so pip keeps it. xformers is left out:
# its wheels pin one torch release and would pull another; PyTorch's own SDPA attention is used instead.
# pyarrow (the export extra) lets `sygil-bot export-feedback` write Parquet inside the container.
RUN pip install ".[export]"
COPY --chown=sygil config.example.toml /app/config.example.toml

USER sygil
VOLUME ["/data"]
# Mount your config at /data/config.toml; set storage.path = "/data/sygil.db" in it.
CMD ["sygil-bot", "run", "--config", "/data/config.toml"]

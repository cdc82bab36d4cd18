# sygil-bot on a CUDA GPU. Build: docker build -t sygil-bot .
# Run:  docker run --gpus all --stop-timeout 45 --env-file discord.env -v "$PWD/data:/data" -v sygil-cache:/cache sygil-bot
# discord.env: DISCORD_TOKEN=...; data/config.toml: the config, with storage.path = "/data/sygil.db" (README, Docker).
#
# The base image's torch is the one the bot runs on: every library pinned in constraints.txt accepts it
# (tests/test_deploy.py checks each one's torch requirement against this tag), and the install below pins torch to
# it, so a library that wanted another torch would fail the build instead of pulling a second torch and CUDA stack.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

# uid 1000 owns the folders the volumes mount: a new named volume takes the owner of the image's folder, so the
# bot can write its database in /data and the model download in /cache.
RUN useradd --create-home --uid 1000 sygil \
    && mkdir -p /data /cache/huggingface \
    && chown -R sygil:sygil /data /cache
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY bot ./bot
COPY cogs ./cogs
# constraints.txt: the tested versions of every library. torch-constraint.txt: the base image's own torch build.
# xformers is left out: its wheels pin one torch release; PyTorch's own SDPA attention is used instead.
# pyarrow (the export extra) lets `sygil-bot export-feedback` write Parquet inside the container.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && pip install -c constraints.txt -c /tmp/torch-constraint.txt ".[export]" \
    && rm /tmp/torch-constraint.txt
COPY --chown=sygil config.example.toml worker.example.toml /app/

USER sygil
# Relative paths in a config (storage.path = "sygil.db", as in worker.example.toml) land in the data volume.
WORKDIR /data
VOLUME ["/data", "/cache"]
# While the bot is connected to Discord with its workers up it rewrites /data/bot.health; `sygil-bot health` reads
# it (1 and one line saying why when it is missing, stale or unhealthy). The start period covers loading and
# warming up the model (compiling, with engine.compile, takes minutes). A worker container checks with --worker
# (compose.yaml).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["sygil-bot", "health", "--config", "/data/config.toml"]
# Mount your config at /data/config.toml; set storage.path = "/data/sygil.db" in it.
CMD ["sygil-bot", "run", "--config", "/data/config.toml"]

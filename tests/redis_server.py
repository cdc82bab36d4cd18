"""A real Redis server for the cluster tests: started on 127.0.0.1 on a free port, stoppable and restartable.

``scripts/test`` installs the distribution's ``redis-server``; without it these tests fail with that advice.
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

# What `openssl rand -base64 32` prints (44 characters of A-Z a-z 0-9 + /, ending in =), the way compose passes it to
# Redis and in the broker URL: raw. This one holds all three of + / =.
BASE64_PASSWORD = base64.b64encode(b"\xfb\xef\xff" + bytes(range(29))).decode()


class RedisServer:
    """``redis-server`` in a temporary folder; ``stop`` and ``start`` again keep the port (not the data).

    With a ``password``, the server requires it and ``url`` carries it as written, as a broker URL does (compose
    passes the password raw, ``/`` and all: ``redis.Redis.from_url`` cannot read that, so ``client`` does not use it).
    """

    def __init__(self, folder: Path, *, password: str | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed: run scripts/test, or apt-get install -y redis-server")
        self.executable = executable
        self.folder = folder
        self.password = password
        self.port = _free_port()
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server (empty: it saves nothing) and wait until it answers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [self.executable, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), *(["--requirepass", self.password] if self.password else [])],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        client = self.client()
        try:
            for _ in range(200):
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if self._process.poll() is not None:
                        raise RuntimeError(f"redis-server exited: {(self.folder / 'redis.log').read_text()}") from None
                    time.sleep(0.05)
            raise RuntimeError("redis-server did not answer within 10 s")
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server at once (SIGKILL: what a crash or a lost host looks like to its clients)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

"""A real Redis server for the cluster tests: started on 127.0.0.1 on a free port, stoppable and restartable.

``scripts/test`` installs the distribution's ``redis-server``; without it these tests fail with that advice.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from bot.cluster import acl
from bot.cluster.broker import connect, parse
from bot.cluster.wire import Keys

# What `openssl rand -base64 32` prints (44 characters of A-Z a-z 0-9 + /, ending in =), the way compose passes it to
# Redis and in the broker URL: raw. This one holds all three of + / =.
BASE64_PASSWORD = base64.b64encode(b"\xfb\xef\xff" + bytes(range(29))).decode()


class RedisServer:
    """``redis-server`` in a temporary folder; ``stop`` and ``start`` again keep the port (not the data).

    With a ``password``, the server requires it and ``url`` carries it as written, as a broker URL does (compose
    passes the password raw, ``/`` and all: ``redis.Redis.from_url`` cannot read that, so ``client`` does not use it).

    With ``acl``, the server keeps its users in ``aclfile`` (in its folder, so they outlive a restart), the default
    user is the admin (its password ``password``, or ``BASE64_PASSWORD``), and ``url`` and ``client`` are the admin's;
    ``bot_url`` and ``add_worker`` make the bot's and workers' users with ``bot.cluster.acl``. ``args`` go to
    redis-server as they are (TLS ports and files).

    With ``launch`` (and its ``env``), that command starts the server instead, given ``--bind`` and ``--port`` after
    its own arguments: compose.yaml's command, run as it is.
    """

    def __init__(
        self,
        folder: Path,
        *,
        password: str | None = None,
        acl: bool = False,
        args: Sequence[str] = (),
        launch: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed: run scripts/test, or apt-get install -y redis-server")
        self.executable = executable
        self.folder = folder
        self.acl = acl
        self.password = password or (BASE64_PASSWORD if acl else None)
        self.aclfile = folder / "users.acl"
        self.args = tuple(args)
        self.launch = tuple(launch)
        self.env = dict(env) if env is not None else None
        self.port = free_port()
        self.url = f"redis://{f':{self.password}@' if self.password else ''}127.0.0.1:{self.port}/0"
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
        if self.acl and not self.launch:
            if not self.aclfile.exists():
                digest = hashlib.sha256((self.password or "").encode()).hexdigest()
                self.aclfile.write_text(f"user default on #{digest} ~* &* +@all\n")
            access = ["--aclfile", str(self.aclfile)]
        else:
            access = ["--requirepass", self.password] if self.password else []
        if self.launch:
            command = [*self.launch, "--bind", "127.0.0.1", "--port", str(self.port)]
        else:
            command = [self.executable, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly",
                       "no", "--dir", str(self.folder), *access, *self.args]  # fmt: skip
        log = (self.folder / "redis.log").open("ab")
        self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
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

    async def bot_url(self, prefix: str = "sygil") -> str:
        """Create (or reset) the bot's ACL user of cluster ``prefix``; return its broker URL."""
        async with connect(self.url) as admin:
            return await acl.add_bot(admin, Keys(prefix), parse(self.url))

    async def add_worker(self, name: str, prefix: str = "sygil", *, db: int = 0) -> str:
        """Create worker ``name``'s ACL user of cluster ``prefix``; return its broker URL (to database ``db``)."""
        async with connect(self.url) as admin:
            where = parse(self.url)
            return await acl.add_worker(admin, Keys(prefix), name, replace(where, db=db))


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

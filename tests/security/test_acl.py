"""A donated GPU is a stranger: on a real redis-server with ACLs, a worker's user may do what the worker protocol
needs and nothing else, the bot's may do what the bot needs, and `sygil-bot cluster` adds and revokes them."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.retry import Retry

from bot.__main__ import main
from bot.cluster.acl import REVOKED_HOLDER
from bot.cluster.broker import connect, create_group, entries, parse
from bot.cluster.wire import GROUP, Keys
from bot.errors import ConfigError
from tests.redis_server import BASE64_PASSWORD, RedisServer, free_port

KEYS = Keys("sygil")
ME = "gpu-a"
OTHER = "gpu-ab"  # its name starts with ME's: its keys still do not match ME's pattern
SESSION = "s1"

# Runs ``sygil-bot ARGS`` in this process: its exit status, standard output and standard error.
Cli = Callable[..., tuple[int, str, str]]


@dataclass
class Cluster:
    admin: Redis
    bot: Redis
    worker: Redis  # ME's user
    other: Redis  # OTHER's user


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", acl=True) as server:
        yield server


@pytest.fixture
async def cluster(server: RedisServer) -> AsyncIterator[Cluster]:
    """A bot that made its group, queued a batch, announced itself and stopped a batch; OTHER beat and spoke."""
    bot_url = await server.bot_url()
    mine, others = await server.add_worker(ME), await server.add_worker(OTHER)
    async with connect(server.url) as admin, connect(bot_url) as bot, connect(mine) as worker, connect(others) as other:
        await create_group(bot, KEYS.batches)
        await bot.xadd(KEYS.batches, {"data": "{}"})
        await bot.set(KEYS.bot, "announced", ex=60)
        await bot.set(KEYS.stop(SESSION, 1), 1, ex=60)
        await other.set(KEYS.beat(OTHER, "cuda:0"), "{}", ex=60)
        await other.xadd(KEYS.events(OTHER, SESSION), {"data": "{}"})
        yield Cluster(admin, bot, worker, other)


CANDIDATE = "b" * 40  # a candidate revision (model.candidates): its batches have a stream of their own

FORBIDDEN = {
    "FLUSHALL": ["FLUSHALL"],
    "FLUSHDB": ["FLUSHDB"],
    "set the pin": ["SET", KEYS.bot, "forged"],
    "delete the pin": ["DEL", KEYS.bot],
    "add a batch": ["XADD", KEYS.batches, "*", "data", "{}"],
    "add a candidate's batch": ["XADD", KEYS.batches_of(CANDIDATE), "*", "data", "{}"],
    "read a candidate's batches outside the group": ["XRANGE", KEYS.batches_of(CANDIDATE), "-", "+"],
    "a stream beside the batches": ["XADD", f"{KEYS.batches}x", "*", "data", "{}"],
    "delete a batch": ["XDEL", KEYS.batches, "0-1"],
    "trim the batches": ["XTRIM", KEYS.batches, "MAXLEN", "0"],
    "read all batches": ["XRANGE", KEYS.batches, "-", "+"],
    "read batches outside the group": ["XREAD", "STREAMS", KEYS.batches, "0"],
    "inspect the batches": ["XINFO", "STREAM", KEYS.batches],
    "delete the batches": ["DEL", KEYS.batches],
    "GET the batches": ["GET", KEYS.batches],
    "create a group": ["XGROUP", "CREATE", KEYS.batches, "mine", "0"],
    "destroy the group": ["XGROUP", "DESTROY", KEYS.batches, GROUP],
    "delete a consumer": ["XGROUP", "DELCONSUMER", KEYS.batches, GROUP, f"{OTHER}/cuda:0"],
    "move the group": ["XGROUP", "SETID", KEYS.batches, GROUP, "$"],
    "KEYS": ["KEYS", "*"],
    "SCAN": ["SCAN", "0"],
    "CONFIG GET": ["CONFIG", "GET", "*"],
    "CONFIG SET": ["CONFIG", "SET", "maxmemory", "1"],
    "EVAL": ["EVAL", "return 1", "0"],
    "FUNCTION LIST": ["FUNCTION", "LIST"],
    "ACL SETUSER": ["ACL", "SETUSER", ME, "~*", "+@all"],
    "ACL LIST": ["ACL", "LIST"],
    "ACL WHOAMI": ["ACL", "WHOAMI"],
    "CLIENT LIST": ["CLIENT", "LIST"],
    "CLIENT KILL": ["CLIENT", "KILL", "USER", OTHER],
    "INFO": ["INFO"],
    "SELECT another database": ["SELECT", "1"],
    "PUBLISH": ["PUBLISH", "sygil", "x"],
    "SUBSCRIBE": ["SUBSCRIBE", "sygil"],
    "another worker's heartbeat: SET": ["SET", KEYS.beat(OTHER, "x"), "{}"],
    "another worker's heartbeat: GET": ["GET", KEYS.beat(OTHER, "cuda:0")],
    "another worker's heartbeat: DEL": ["DEL", KEYS.beat(OTHER, "cuda:0")],
    "another worker's events: XADD": ["XADD", KEYS.events(OTHER, SESSION), "*", "data", "{}"],
    "another worker's events: DEL": ["DEL", KEYS.events(OTHER, SESSION)],
    "another worker's events: XRANGE": ["XRANGE", KEYS.events(OTHER, SESSION), "-", "+"],
    "own and another's key at once": ["DEL", KEYS.beat(ME, "cuda:0"), KEYS.beat(OTHER, "cuda:0")],
    "set a stop flag": ["SET", KEYS.stop(SESSION, 2), "1"],
    "delete a stop flag": ["DEL", KEYS.stop(SESSION, 1)],
    "a key outside the cluster": ["SET", "elsewhere", "1"],
    "RENAME its key onto the pin": ["RENAME", KEYS.beat(ME, "cuda:0"), KEYS.bot],
    "COPY the pin": ["COPY", KEYS.bot, KEYS.beat(ME, "copy")],
}


@pytest.mark.parametrize("command", FORBIDDEN.values(), ids=FORBIDDEN.keys())
async def test_a_worker_is_refused_every_command_but_its_own(cluster: Cluster, command: list[str]) -> None:
    with pytest.raises(NoPermissionError):
        await cluster.worker.execute_command(*command)  # pyright: ignore[reportUnknownMemberType]
    # Nothing moved: the batch, the group, the pin, the stop flag and the other worker's keys are as they were.
    assert await cluster.admin.xlen(KEYS.batches) == 1
    assert [group["name"] for group in await cluster.admin.xinfo_groups(KEYS.batches)] == [GROUP.encode()]
    assert await cluster.admin.get(KEYS.bot) == b"announced"
    assert await cluster.admin.exists(KEYS.stop(SESSION, 1), KEYS.stop(SESSION, 2)) == 1
    assert await cluster.admin.exists(KEYS.beat(OTHER, "cuda:0"), KEYS.events(OTHER, SESSION)) == 2
    assert await cluster.admin.dbsize() == 5


async def test_a_worker_may_do_all_the_worker_protocol_needs(cluster: Cluster) -> None:
    worker, device, spare = cluster.worker, f"{ME}/cuda:0", f"{ME}/cuda:1"
    assert await worker.ping()  # pyright: ignore[reportUnknownMemberType]
    # Reading the announcement and the stop flags, as held.py does, in one pipeline.
    async with worker.pipeline(transaction=False) as pipe:
        pipe.get(KEYS.bot)
        pipe.exists(KEYS.stop(SESSION, 1))
        pipe.exists(KEYS.stop(SESSION, 2))
        assert await pipe.execute() == [b"announced", 1, 0]
    # Its heartbeat: written once (NX), renewed, read, given a TTL, deleted at exit.
    beat = KEYS.beat(ME, "cuda:0")
    assert await worker.set(beat, "{}", ex=30, nx=True)
    assert await worker.set(beat, "{2}", ex=30)
    assert await worker.get(beat) == b"{2}"
    assert await worker.expire(beat, 60)
    assert await worker.exists(beat) == 1
    # Taking a batch as a consumer, holding it (XPENDING, renewed with XCLAIM), handing it on and acknowledging it.
    reply: Any = await worker.xreadgroup(GROUP, device, {KEYS.batches: ">"}, count=1)
    ((entry_id, fields),) = entries(reply)
    assert fields == {b"data": b"{}"}
    held = await worker.xpending_range(KEYS.batches, GROUP, entry_id, entry_id, 1, consumername=device)
    assert [entry["consumer"] for entry in held] == [device.encode()]
    assert (await worker.xpending(KEYS.batches, GROUP))["pending"] == 1
    assert await worker.xclaim(KEYS.batches, GROUP, device, 0, [entry_id], justid=True) == [entry_id]
    claimed = await worker.xautoclaim(KEYS.batches, GROUP, spare, 0, start_id="0-0", count=1, justid=True)
    assert claimed == [entry_id]
    # Its events: Started, Rendered… on its own stream, capped as held.py caps it.
    events = KEYS.events(ME, SESSION)
    assert await worker.xadd(events, {"data": "{}", "b0": b"\x89PNG"}, maxlen=1000, approximate=True)
    assert await worker.xack(KEYS.batches, GROUP, entry_id) == 1
    assert await worker.delete(beat, events) == 2


async def test_a_worker_takes_a_candidate_revisions_batches_as_a_consumer(cluster: Cluster) -> None:
    stream, device = KEYS.batches_of(CANDIDATE), f"{ME}/cuda:0"
    await create_group(cluster.bot, stream)
    await cluster.bot.xadd(stream, {"data": "{}"})
    reply: Any = await cluster.worker.xreadgroup(GROUP, device, {stream: ">"}, count=1)
    ((entry_id, _),) = entries(reply)
    assert await cluster.worker.xclaim(stream, GROUP, device, 0, [entry_id], justid=True) == [entry_id]
    assert await cluster.worker.xack(stream, GROUP, entry_id) == 1
    with pytest.raises(NoPermissionError):
        await cluster.worker.xdel(stream, entry_id)


async def test_a_worker_on_another_database_connects_with_select(server: RedisServer) -> None:
    url = await server.add_worker(ME, db=1)
    assert parse(url).db == 1
    async with connect(url) as worker:
        assert await worker.ping()  # pyright: ignore[reportUnknownMemberType] (redis-py sent SELECT 1 first)
        assert await worker.set(KEYS.beat(ME, "cuda:0"), "{}", ex=30)
        with pytest.raises(NoPermissionError):
            await worker.set(KEYS.bot, "forged")
    with server.client() as admin:
        assert admin.execute_command("SELECT", "1") and admin.exists(KEYS.beat(ME, "cuda:0")) == 1


async def test_the_bot_may_do_what_it_needs_and_not_the_dangerous_commands(cluster: Cluster) -> None:
    bot = cluster.bot
    await create_group(bot, KEYS.batches)  # BUSYGROUP: exists already
    entry_id = await bot.xadd(KEYS.batches, {"data": "{}"}, maxlen=10_000, approximate=True)
    async with bot.pipeline(transaction=False) as pipe:
        pipe.set(KEYS.bot, "announced", ex=30)
        pipe.expire(KEYS.events(OTHER, SESSION), 60)
        pipe.set(KEYS.stop(SESSION, 3), 1, ex=60)
        assert await pipe.execute() == [True, True, True]
    beats = [key async for key in bot.scan_iter(match=KEYS.beats, count=100)]  # pyright: ignore[reportUnknownMemberType]
    assert beats == [KEYS.beat(OTHER, "cuda:0").encode()]
    assert await bot.mget(beats) == [b"{}"]
    assert len(entries(await bot.xread({KEYS.events(OTHER, SESSION): "0"}, count=10))) == 1
    assert (await bot.xpending(KEYS.batches, GROUP))["pending"] == 0
    script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])"
    assert await bot.eval(script, 1, KEYS.bot, "pinned") == b"pinned"  # pyright: ignore[reportUnknownMemberType]
    assert await bot.xdel(KEYS.batches, entry_id) == 1
    assert await bot.xtrim(KEYS.batches, maxlen=0) == 1
    assert await bot.delete(KEYS.bot) == 1
    for command in (
        ["FLUSHALL"],
        ["FLUSHDB"],
        ["KEYS", "*"],
        ["CONFIG", "GET", "*"],
        ["ACL", "LIST"],
        ["ACL", "SETUSER", "sygil-bot", "~*"],
        ["CLIENT", "KILL", "USER", ME],
        ["SWAPDB", "0", "1"],
        ["SET", "elsewhere", "1"],
        ["PUBLISH", "sygil", "x"],
    ):
        with pytest.raises(NoPermissionError):
            await bot.execute_command(*command)  # pyright: ignore[reportUnknownMemberType]


# sygil-bot cluster ...


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.delenv("SYGIL_REDIS_ADMIN", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        status = main(["cluster", *args])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def worker_client(url: str) -> redis.Redis:
    broker = parse(url)
    return redis.Redis(
        host=broker.host,
        port=broker.port,
        username=broker.username,
        password=broker.password,
        retry=Retry(NoBackoff(), 0),  # a refused password is an answer: no tries again
    )


def users_connected(server: RedisServer) -> list[str]:
    with server.client() as admin:
        return [client["user"] for client in admin.client_list()]  # pyright: ignore[reportUnknownVariableType]


def test_add_worker_prints_a_url_that_logs_in_as_that_worker_alone(server: RedisServer, cli: Cli) -> None:
    status, out, err = cli("add-worker", ME, "--admin", server.url)
    assert status == 0, err
    (url,) = out.splitlines()
    broker = parse(url)
    assert (broker.scheme, broker.host, broker.port, broker.db, broker.username) == (
        "redis",
        "127.0.0.1",
        server.port,
        0,
        ME,
    )
    assert broker.password and broker.password != server.password
    assert f"Worker {ME} may now take batches" in err and BASE64_PASSWORD not in out + err
    assert cli("workers", "--admin", server.url)[1].splitlines() == [f"{ME}: offline"]
    with worker_client(url) as worker:
        assert worker.set(KEYS.beat(ME, "cuda:0"), "{}", ex=30)
        assert ME in users_connected(server)
        with pytest.raises(NoPermissionError):
            worker.set(KEYS.beat(OTHER, "cuda:0"), "{}")
    # --host, --port and --tls shape the printed URL: what workers elsewhere use to reach this Redis.
    status, out, _ = cli(
        "add-worker", OTHER, "--admin", server.url, "--host", "queue.example", "--port", "6380", "--tls"
    )
    assert status == 0
    assert str(parse(out.strip())) == f"rediss://{OTHER}:***@queue.example:6380/0"


def test_revoke_worker_refuses_its_url_closes_its_connection_and_removes_its_keys_and_consumers(
    server: RedisServer, cli: Cli
) -> None:
    url = cli("add-worker", ME, "--admin", server.url)[1].strip()
    others = cli("add-worker", OTHER, "--admin", server.url)[1].strip()
    with server.client() as admin, worker_client(url) as worker, worker_client(others) as other:
        admin.xgroup_create(KEYS.batches, GROUP, id="0", mkstream=True)
        entry_id = admin.xadd(KEYS.batches, {"data": "{}"})
        assert worker.xreadgroup(GROUP, f"{ME}/cuda:0", {KEYS.batches: ">"}, count=1)
        # It held a candidate revision's batch too, on another device.
        candidate = KEYS.batches_of(CANDIDATE)
        admin.xgroup_create(candidate, GROUP, id="0", mkstream=True)
        candidate_entry = admin.xadd(candidate, {"data": "{}"})
        assert worker.xreadgroup(GROUP, f"{ME}/cuda:1", {candidate: ">"}, count=1)
        worker.set(KEYS.beat(ME, "cuda:0"), "{}", ex=60)
        worker.xadd(KEYS.events(ME, SESSION), {"data": "{}"})
        other.set(KEYS.beat(OTHER, "cuda:0"), "{}", ex=60)
        assert cli("workers", "--admin", server.url)[1].splitlines() == [
            f"{ME}: connected (1 connection), heartbeats from cuda:0",
            f"{OTHER}: connected (1 connection), heartbeats from cuda:0",
        ]
        connection = worker.connection_pool.get_connection()
        connection.send_command("PING")
        assert connection.read_response() == b"PONG"

        status, out, err = cli("revoke-worker", ME, "--admin", server.url)
        assert status == 0, err
        assert out.splitlines() == [
            f"Revoked worker {ME}: its user is deleted, 1 connection closed, 2 keys and 2 consumers removed, "
            "2 batches left for the other workers to take."
        ]
        with pytest.raises(redis.ConnectionError):  # the open connection was closed by Redis
            connection.send_command("PING")
            connection.read_response()
        worker.connection_pool.release(connection)
        with pytest.raises(AuthenticationError), worker_client(url) as again:
            again.ping()
        assert ME not in users_connected(server)
        assert sorted(admin.scan_iter(match="sygil:w:*")) == [KEYS.beat(OTHER, "cuda:0").encode()]
        consumers = [consumer["name"] for consumer in admin.xinfo_consumers(KEYS.batches, GROUP)]
        assert consumers == [REVOKED_HOLDER.encode()]
        # Its batch is not lost: another worker's next XAUTOCLAIM (any lease under a year) takes it at once.
        claimed = other.xautoclaim(KEYS.batches, GROUP, f"{OTHER}/cuda:0", 3_600_000, count=10, justid=True)
        assert claimed == [entry_id]
        assert [consumer["name"] for consumer in admin.xinfo_consumers(candidate, GROUP)] == [REVOKED_HOLDER.encode()]
        claimed = other.xautoclaim(candidate, GROUP, f"{OTHER}/cuda:0", 3_600_000, count=10, justid=True)
        assert claimed == [candidate_entry]
        assert cli("workers", "--admin", server.url)[1].splitlines() == [
            f"{OTHER}: connected (1 connection), heartbeats from cuda:0"
        ]


def test_users_and_revocations_outlive_a_restart_through_the_aclfile(server: RedisServer, cli: Cli) -> None:
    kept = cli("add-worker", ME, "--admin", server.url)[1].strip()
    gone = cli("add-worker", OTHER, "--admin", server.url)[1].strip()
    bot_status, bot_url, _ = cli("add-bot", "--admin", server.url)
    assert bot_status == 0 and parse(bot_url.strip()).username == "sygil-bot"
    assert cli("revoke-worker", OTHER, "--admin", server.url)[0] == 0
    server.stop()
    server.start()
    assert cli("workers", "--admin", server.url)[1].splitlines() == [f"{ME}: offline"]
    with worker_client(kept) as worker:
        assert worker.ping()
    with worker_client(bot_url.strip()) as bot:
        assert bot.set(KEYS.bot, "{}")
    with pytest.raises(AuthenticationError), worker_client(gone) as revoked:
        revoked.ping()
    with server.client() as admin:  # the admin password came through too
        assert admin.ping()


def test_cluster_commands_refuse_in_one_line(server: RedisServer, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: str) -> tuple[int, str]:
        status, out, err = cli(*args)
        assert not out and len(err.splitlines()) == 1 and "Traceback" not in err, (out, err)
        assert BASE64_PASSWORD not in err
        return status, err.strip()

    admin = ["--admin", server.url]
    assert refused("add-worker", "bad/name", *admin) == (
        2,
        "sygil-bot: 'bad/name' is not a worker name: 1 to 48 letters, digits, '.', '_' or '-', starting with a letter "
        "or digit",
    )
    assert refused("add-worker", "sygil-bot", *admin)[0] == 2
    assert refused("add-worker", "default", *admin)[0] == 2
    assert refused("add-worker", ME, "--prefix", "a*b", *admin)[0] == 2
    assert refused("add-worker", ME)[1].startswith("sygil-bot: no admin URL: pass --admin URL or set SYGIL_REDIS_ADMIN")
    assert cli("add-worker", ME, *admin)[0] == 0
    assert refused("add-worker", ME, *admin) == (
        1,
        f"sygil-bot: a worker named {ME} exists already: choose another name, or revoke it first "
        f"(sygil-bot cluster revoke-worker {ME})",
    )
    assert refused("revoke-worker", "nobody", *admin) == (
        1,
        "sygil-bot: no worker named nobody in this cluster (prefix sygil): see sygil-bot cluster workers",
    )
    # Another cluster's worker of the same name is not this cluster's.
    assert refused("revoke-worker", ME, "--prefix", "other", *admin)[0] == 1
    wrong = server.url.replace(BASE64_PASSWORD, "wrong-password")
    status, line = refused("workers", "--admin", wrong)
    assert status == 1 and line.startswith(f"sygil-bot: Redis at redis://:***@127.0.0.1:{server.port}/0 refused the")
    assert "wrong-password" not in line
    away = f"redis://:{BASE64_PASSWORD}@127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("SYGIL_REDIS_ADMIN", away)
    status, line = refused("workers")
    assert status == 1 and line.startswith("sygil-bot: Cannot reach Redis at redis://:***@127.0.0.1:")
    # A worker's user is no admin.
    worker_url = cli("add-worker", OTHER, *admin)[1].strip()
    status, line = refused("add-worker", "gpu-c", "--admin", worker_url)
    assert status == 1 and "may not do this" in line


# TLS


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """Make a throwaway CA and a certificate for 127.0.0.1 signed by it; return (CA, certificate, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: no certificates for the TLS test")
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key, cert, key, request = (folder / name for name in ("ca.crt", "ca.key", "server.crt", "server.key", "req"))
    extensions = folder / "san.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=sygil test CA"],
        [openssl, "req", *ec, "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "1", "-extfile", extensions],
    ):  # fmt: skip
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return ca, cert, key


def test_a_worker_reaches_redis_over_tls_with_a_rediss_url(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = make_certificates(tmp_path / "tls")
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]  # fmt: skip
    server = RedisServer(tmp_path / "redis", acl=True, args=tls)
    try:
        server.start()
    except RuntimeError as error:
        if "tls" in str(error).lower():
            pytest.skip(f"this redis-server was built without TLS: {error}")
        raise
    try:
        status, out, err = cli("add-worker", ME, "--admin", server.url, "--tls", "--port", str(tls_port))
        assert status == 0, err
        url = out.strip()
        assert url.startswith(f"rediss://{ME}:") and url.endswith(f"@127.0.0.1:{tls_port}/0")

        async def use() -> list[str]:
            async with connect(url) as worker:
                await worker.set(KEYS.beat(ME, "cuda:0"), "{}", ex=30)
                with pytest.raises(NoPermissionError):
                    await worker.set(KEYS.bot, "forged")
            async with connect(server.url) as admin:
                clients = await admin.client_list()  # pyright: ignore[reportUnknownMemberType]
                return [client["user"] for client in clients]  # pyright: ignore[reportUnknownVariableType]

        # Without our CA the server's certificate is refused: rediss:// verifies it.
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "tls" / "none.pem"))
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            asyncio.run(use())
        # SYGIL_BROKER_CA names the CA that signed it, for the broker alone.
        monkeypatch.setenv("SYGIL_BROKER_CA", str(ca))
        asyncio.run(use())
        monkeypatch.setenv("SYGIL_BROKER_CA", str(tmp_path / "missing.pem"))
        with pytest.raises(ConfigError, match=r"SYGIL_BROKER_CA: .*missing.pem is not a file"):
            connect(url)
        # Or OpenSSL's SSL_CERT_FILE (for the whole process): what broker.connect's default context trusts.
        monkeypatch.delenv("SYGIL_BROKER_CA")
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        asyncio.run(use())
        with server.client() as admin:
            assert admin.get(KEYS.beat(ME, "cuda:0")) == b"{}"
    finally:
        server.stop()

"""Drive a real discord.py bot against the fake Discord server."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import sys
import textwrap
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from discord.gateway import DiscordWebSocket
from discord.http import MultipartParameters, Route

from tests.fakediscord import FakeDiscord, capture_discord_errors, point_discord_at, run_bot

ACK_TIMEOUT = 0.3
TOKEN_TTL = 0.6


def _png(width: int, height: int) -> bytes:
    """Return a valid black RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x00\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


PNG = _png(3, 2)
PNG_2 = _png(4, 4)


class Vote(discord.ui.DynamicItem[discord.ui.Button], template=r"test:vote:(?P<count>\d+)"):
    """A stateless vote button."""

    def __init__(self, count: int) -> None:
        super().__init__(discord.ui.Button(label="Vote", custom_id=f"test:vote:{count}"))
        self.count = count

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: Any, /) -> Vote:
        return cls(int(match["count"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.edit_message(content=f"voted {self.count}")


class _RawView(discord.ui.View):
    """A view that sends raw component payloads, to break the limits discord.py would enforce."""

    def __init__(self, components: list[dict[str, Any]]) -> None:
        super().__init__(timeout=None)
        self._raw = components

    def to_components(self) -> list[dict[str, Any]]:
        return self._raw


class Bot(commands.Bot):
    """A minimal slash-command bot."""

    def __init__(self) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.1,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.choice_count = 3
        self.errors: list[discord.HTTPException] = []
        for command in (imagine, secret, retouch, misbehave, crash, settings):
            self.tree.add_command(command)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(Vote)
        await self.tree.sync()


@app_commands.command()
@app_commands.describe(prompt="What to draw", count="How many")
async def imagine(interaction: discord.Interaction[Bot], prompt: str, count: app_commands.Range[int, 1, 4] = 1) -> None:
    """Draw a picture."""
    await interaction.response.defer(thinking=True)
    view = discord.ui.View(timeout=None)
    view.add_item(Vote(count))
    await interaction.followup.send(f"{prompt} x{count}", file=discord.File(io.BytesIO(PNG), "out.png"), view=view)


@imagine.autocomplete("prompt")
async def _imagine_prompt(interaction: discord.Interaction[Bot], current: str) -> list[app_commands.Choice[str]]:
    return [
        app_commands.Choice(name=f"{current}:{n}", value=f"{current}:{n}")
        for n in range(interaction.client.choice_count)
    ]


@app_commands.command()
async def secret(interaction: discord.Interaction[Bot]) -> None:
    """Whisper."""
    await interaction.response.send_message("hush", ephemeral=True)


@app_commands.command()
async def retouch(interaction: discord.Interaction[Bot]) -> None:
    """Reply with a file, then edit the reply to keep it and add another."""
    await interaction.response.send_message("first", file=discord.File(io.BytesIO(PNG), "a.png"))
    message = await interaction.original_response()
    files = [*message.attachments, discord.File(io.BytesIO(PNG_2), "b.png")]
    await interaction.edit_original_response(content="second", attachments=files)


settings = app_commands.Group(name="settings", description="Settings.")


@settings.command(name="show")
async def settings_show(interaction: discord.Interaction[Bot], page: int = 1) -> None:
    """Show one page of settings to whoever asks."""
    member, channel = interaction.user, interaction.channel
    roles = [r.name for r in member.roles[1:]] if isinstance(member, discord.Member) else []
    where = channel.name if isinstance(channel, discord.TextChannel) else "?"
    await interaction.response.send_message(f"page {page} for {member.name} {roles} in #{where}", ephemeral=True)


@app_commands.command()
async def crash(interaction: discord.Interaction[Bot]) -> None:
    """Raise."""
    raise RuntimeError("boom")


async def _late(interaction: discord.Interaction[Bot]) -> None:
    await asyncio.sleep(ACK_TIMEOUT + 0.1)
    await interaction.response.send_message("too late")


async def _double(interaction: discord.Interaction[Bot]) -> None:
    await interaction.response.defer()
    interaction.response._response_type = None  # as if a second handler answered the same interaction
    await interaction.response.defer()


async def _expired(interaction: discord.Interaction[Bot]) -> None:
    await interaction.response.defer()
    await asyncio.sleep(TOKEN_TTL + 0.1)
    await interaction.followup.send("too late")


def _raw(components: list[dict[str, Any]]) -> Callable[[discord.Interaction[Bot]], Awaitable[None]]:
    async def send(interaction: discord.Interaction[Bot]) -> None:
        await interaction.response.send_message("rows", view=_RawView(components))

    return send


def _buttons(*custom_ids: str) -> dict[str, Any]:
    return {"type": 1, "components": [{"type": 2, "style": 1, "label": "b", "custom_id": c} for c in custom_ids]}


async def _embeds(interaction: discord.Interaction[Bot]) -> None:
    await interaction.response.defer()
    params = MultipartParameters({"embeds": [{"title": str(n)} for n in range(11)]}, None, None)
    await interaction.client.http.send_message(interaction.channel_id or 0, params=params)


MISDEEDS: dict[str, Callable[[discord.Interaction[Bot]], Awaitable[object]]] = {
    "late": _late,
    "double": _double,
    "early_followup": lambda interaction: interaction.followup.send("before any callback"),
    "expired": _expired,
    "long": lambda interaction: interaction.response.send_message("x" * 2001),
    "empty": lambda interaction: interaction.response.send_message(),
    "six_rows": _raw([_buttons(f"r{n}") for n in range(6)]),
    "wide_row": _raw([_buttons(*(f"b{n}" for n in range(6)))]),
    "long_custom_id": _raw([_buttons("x" * 101)]),
    "duplicate_custom_id": _raw([_buttons("same", "same")]),
    "eleven_embeds": _embeds,
    "big_file": lambda interaction: interaction.response.send_message(
        file=discord.File(io.BytesIO(b"0" * 5000), "a.bin")
    ),
}


@app_commands.command()
async def misbehave(interaction: discord.Interaction[Bot], what: str) -> None:
    """Break one of Discord's rules."""
    try:
        await MISDEEDS[what](interaction)
    except discord.HTTPException as error:
        interaction.client.errors.append(error)


async def _eventually(check: Callable[[], object], timeout: float = 5) -> None:  # noqa: ASYNC109
    """Poll until check() is truthy: for state that lives in the bot, which the fake cannot signal."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@pytest.fixture
async def server() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(
        ack_timeout=ACK_TIMEOUT, interaction_token_ttl=TOKEN_TTL, attachment_size_limit=4096
    ) as fake:
        yield fake


@pytest.fixture
async def bot(server: FakeDiscord) -> AsyncIterator[Bot]:
    async with run_bot(Bot(), server) as running:
        yield running


async def test_login_sync_and_guild(server: FakeDiscord, bot: Bot) -> None:
    assert bot.user is not None and bot.user.id == server.bot_user_id
    assert bot.application_id == server.application_id
    guild = bot.get_guild(server.guild_id)
    assert guild is not None and guild.get_channel(server.channel_id) is not None
    assert guild.me is not None  # other members are cached only with the members intent
    assert server.command_syncs == 1
    assert set(server.commands) == {"imagine", "secret", "retouch", "misbehave", "crash", "settings"}
    options = {o["name"]: o for o in server.commands["imagine"]["options"]}
    assert options["prompt"]["autocomplete"] is True and options["count"]["max_value"] == 4
    assert [r.path for r in server.requests[:2]] == ["/users/@me", "/oauth2/applications/@me"]
    assert all(r.status < 400 for r in server.requests)


async def test_slash_defer_followup_file_and_click(server: FakeDiscord, bot: Bot) -> None:
    interaction = await server.slash("imagine", {"prompt": "species:seal", "count": 2})
    assert (await interaction.wait_response())["type"] == 5
    assert interaction.deferred and not interaction.ephemeral
    assert interaction.response_delay is not None and interaction.response_delay < ACK_TIMEOUT
    message = await interaction.wait_message()
    assert message is interaction.original and interaction.followups == [message]  # the followup filled the deferral
    assert message.content == "species:seal x2" and message.custom_ids == ["test:vote:2"]
    assert message.allowed_mentions == {"parse": []} and message.edits == 0
    [attachment] = message.attachments
    assert (attachment.filename, attachment.content_type, attachment.data) == ("out.png", "image/png", PNG)
    assert (attachment.width, attachment.height) == (3, 2)
    async with aiohttp.ClientSession() as session, session.get(attachment.url) as response:
        assert await response.read() == PNG
    upload = next(r for r in server.requests if r.files)
    assert upload.path.startswith("/webhooks/") and upload.files == [("out.png", PNG)]

    with pytest.raises(LookupError):
        await server.click(message.id, "test:vote:3")
    click = await server.click(message.id, "test:vote:2")
    assert (await click.wait_response())["type"] == 7
    assert message.content == "voted 2" and message.edits == 1
    assert server.messages(server.channel_id) == [message]
    server.assert_no_violations()


async def test_ephemeral_reply(server: FakeDiscord, bot: Bot) -> None:
    interaction = await server.slash("secret")
    message = await interaction.wait_message()
    assert interaction.response_type == 4 and interaction.ephemeral and message.ephemeral
    assert message.content == "hush" and message.type == 20
    assert server.messages(server.channel_id) == []
    assert server.messages(server.channel_id, include_ephemeral=True) == [message]


async def test_edit_original_keeps_and_adds_attachments(server: FakeDiscord, bot: Bot) -> None:
    interaction = await server.slash("retouch")
    message = await server.wait_for_message(lambda m: m.content == "second")
    assert message is interaction.original and message.edits == 1
    assert [(a.filename, a.data) for a in message.attachments] == [("a.png", PNG), ("b.png", PNG_2)]
    patch = next(r for r in server.requests if r.method == "PATCH")
    assert patch.path.endswith("/messages/@original") and len(patch.json["attachments"]) == 2


async def test_autocomplete(server: FakeDiscord, bot: Bot) -> None:
    choices = await server.autocomplete("imagine", {"prompt": "spe"}, focused="prompt")
    assert choices == [{"name": f"spe:{n}", "value": f"spe:{n}"} for n in range(3)]
    with pytest.raises(ValueError, match="no autocomplete"):
        await server.autocomplete("imagine", {"prompt": "a", "count": 1}, focused="count")
    server.assert_no_violations()


async def test_options_are_checked_against_the_schema(server: FakeDiscord, bot: Bot) -> None:
    with pytest.raises(ValueError, match="out of range"):
        await server.slash("imagine", {"prompt": "x", "count": 9})
    with pytest.raises(ValueError, match="missing"):
        await server.slash("imagine", {"count": 1})
    with pytest.raises(TimeoutError):
        await server.slash("nope", timeout=0.05)


async def test_subcommand_new_channel_and_member(server: FakeDiscord, bot: Bot) -> None:
    art = server.add_channel("art")
    moderator = server.add_user("mod", roles=["moderator"])
    interaction = await server.slash("settings show", {"page": 2}, user_id=moderator, channel_id=art)
    message = await interaction.wait_message()
    assert message.content == "page 2 for mod ['moderator'] in #art"
    assert message.channel_id == art and message.ephemeral
    assert server.interactions[-1].payload["data"]["options"] == [
        {"type": 1, "name": "show", "options": [{"type": 4, "name": "page", "value": 2}]}
    ]
    with pytest.raises(ValueError, match="group"):
        await server.slash("settings")


async def test_channel_messages_over_rest(server: FakeDiscord, bot: Bot) -> None:
    channel = bot.get_channel(server.channel_id)
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("hello", file=discord.File(io.BytesIO(PNG), "x.png"))
    assert await sent.attachments[0].read() == PNG
    edited = await sent.edit(content="hi", attachments=[*sent.attachments, discord.File(io.BytesIO(PNG_2), "y.png")])
    stored = server.message(sent.id)
    assert stored.content == edited.content == "hi" and stored.edits == 1
    assert [a.filename for a in stored.attachments] == ["x.png", "y.png"]
    assert (await channel.fetch_message(sent.id)).content == "hi"
    await sent.delete()
    assert stored.deleted and server.messages(server.channel_id) == []
    with pytest.raises(discord.NotFound):
        await channel.fetch_message(sent.id)


@pytest.mark.parametrize(
    ("what", "status", "code"),
    [
        ("late", 404, 10062),
        ("double", 400, 40060),
        ("early_followup", 404, 10015),
        ("expired", 401, 50027),
        ("long", 400, 50035),
        ("empty", 400, 50006),
        ("six_rows", 400, 50035),
        ("wide_row", 400, 50035),
        ("long_custom_id", 400, 50035),
        ("duplicate_custom_id", 400, 50035),
        ("eleven_embeds", 400, 50035),
        ("big_file", 413, 40005),
    ],
)
async def test_rule_violations(server: FakeDiscord, bot: Bot, what: str, status: int, code: int) -> None:
    await server.slash("misbehave", {"what": what})
    await _eventually(lambda: bot.errors)
    [error] = bot.errors
    assert (error.status, error.code) == (status, code)
    assert [v.code for v in server.violations] == [code]


async def test_too_many_autocomplete_choices(server: FakeDiscord) -> None:
    bot = Bot()
    bot.choice_count = 30
    with capture_discord_errors(fail=False) as records:
        async with run_bot(bot, server, fail_on_errors=False):
            await server.autocomplete("imagine", {"prompt": "a"}, focused="prompt")
            await _eventually(lambda: records)
    assert [v.code for v in server.violations] == [50035]
    assert "Ignoring exception in autocomplete" in records[0].getMessage()


async def test_errors_in_callbacks_fail_the_test(server: FakeDiscord) -> None:
    with pytest.raises(AssertionError, match=r"boom|crash"):
        async with run_bot(Bot(), server):
            await server.slash("crash")
            await asyncio.sleep(0.1)


async def test_bad_token_and_unknown_route(server: FakeDiscord) -> None:
    with point_discord_at(server):
        async with discord.Client(intents=discord.Intents.none()) as client:
            with pytest.raises(discord.LoginFailure):
                await client.login("wrong")
        async with discord.Client(intents=discord.Intents.none()) as client:
            await client.login(server.token)
            with pytest.raises(discord.NotFound):
                await client.http.request(Route("GET", "/voice/regions"))
    assert Route.BASE == "https://discord.com/api/v10"
    assert str(DiscordWebSocket.DEFAULT_GATEWAY) == "wss://gateway.discord.gg/"
    assert [(r.path, r.status) for r in server.requests] == [
        ("/users/@me", 401),
        ("/users/@me", 200),
        ("/oauth2/applications/@me", 200),
        ("/voice/regions", 404),
    ]
    assert [v.code for v in server.violations] == [0]


async def test_json_content_type_is_exact_and_defaults(server: FakeDiscord) -> None:
    defaults = FakeDiscord()
    assert (defaults.ack_timeout, defaults.interaction_token_ttl) == (3.0, 900.0)
    assert defaults.attachment_size_limit == 10 * 1024 * 1024
    async with aiohttp.ClientSession() as session, session.get(f"{server.api_base_url}/gateway") as response:
        assert response.headers["Content-Type"] == "application/json"
        assert json.loads(await response.text()) == {"url": server.gateway_url}


_SUBPROCESS_BOT = textwrap.dedent(
    """
    import asyncio, io, sys
    import discord, yarl
    from discord.ext import commands

    discord.http.Route.BASE = sys.argv[1]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(sys.argv[2])
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default(), guild_ready_timeout=0.1)

    @bot.tree.command()
    async def ping(interaction: discord.Interaction) -> None:
        \"\"\"Reply with a file, then read it back.\"\"\"
        await interaction.response.send_message("pong", file=discord.File(io.BytesIO(b"abc"), "p.txt"))
        message = await interaction.original_response()
        await interaction.followup.send(f"read {len(await message.attachments[0].read())} bytes")

    @bot.event
    async def setup_hook() -> None:
        await bot.tree.sync()

    bot.run(sys.argv[3], log_handler=None)
    """
)


async def test_bot_in_another_process(server: FakeDiscord) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SUBPROCESS_BOT, server.api_base_url, server.gateway_url, server.token
    )
    try:
        await server.wait_until_connected(timeout=20)
        interaction = await server.slash("ping")
        assert (await interaction.wait_message(timeout=10)).content == "pong"
        followup = await server.wait_for_message(lambda m: m.content.startswith("read"), timeout=10)
        assert followup.content == "read 3 bytes" and interaction.followups == [followup]
        assert interaction.original is not None and interaction.original.attachments[0].content_type == "text/plain"
    finally:
        process.terminate()
        await process.wait()
    server.assert_no_violations()

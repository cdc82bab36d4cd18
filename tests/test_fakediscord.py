"""Drive a real discord.py bot against the fake Discord server."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import sys
import textwrap
import time
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
MANAGE_GUILD = 1 << 5
ADMINISTRATOR = 1 << 3


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
        self.seen: dict[str, Any] = {}
        for command in (imagine, secret, retouch, misbehave, crash, settings, inspect, whoami):
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
async def inspect(
    interaction: discord.Interaction[Bot],
    member: discord.Member,
    user: discord.User,
    role: discord.Role,
    channel: discord.TextChannel,
    where: app_commands.AppCommandChannel,
    target: discord.Member | discord.Role | None = None,
    note: str | None = None,
) -> None:
    """Keep what discord.py made of user, role, channel and mentionable options."""
    interaction.client.seen.update(member=member, user=user, role=role, channel=channel, where=where, target=target)
    await interaction.response.send_message("seen", ephemeral=True)


@inspect.autocomplete("note")
async def _inspect_note(interaction: discord.Interaction[Bot], current: str) -> list[app_commands.Choice[str]]:
    interaction.client.seen["typed_member"] = interaction.namespace.member
    return []


@app_commands.command()
async def whoami(interaction: discord.Interaction[Bot]) -> None:
    """Keep the invoker's permissions and member object."""
    interaction.client.seen.update(permissions=interaction.permissions, invoker=interaction.user)
    await interaction.response.send_message("seen", ephemeral=True)


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
    assert set(server.commands) == {
        "imagine",
        "secret",
        "retouch",
        "misbehave",
        "crash",
        "settings",
        "inspect",
        "whoami",
    }
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


@pytest.mark.e2e
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


async def test_user_role_and_channel_options_resolve(server: FakeDiscord, bot: Bot) -> None:
    manager = server.add_role("manager", MANAGE_GUILD)
    alice = server.add_user("alice", roles=[manager])
    art = server.add_channel("art")
    voice = server.add_channel("lounge", type=2)
    values = {"member": alice, "user": alice, "role": manager, "channel": art, "where": voice, "target": manager}
    interaction = await server.slash("inspect", values)
    await interaction.wait_message()

    data = interaction.payload["data"]
    assert {o["name"]: (o["type"], o["value"]) for o in data["options"]} == {
        "member": (6, str(alice)),
        "user": (6, str(alice)),
        "role": (8, str(manager)),
        "channel": (7, str(art)),
        "where": (7, str(voice)),
        "target": (9, str(manager)),
    }
    resolved = data["resolved"]
    assert set(resolved) == {"users", "members", "roles", "channels"}
    assert resolved["users"][str(alice)]["username"] == "alice"
    member = resolved["members"][str(alice)]
    assert not {"user", "deaf", "mute"} & set(member) and member["roles"] == [str(manager)]
    assert int(member["permissions"]) & MANAGE_GUILD and member["joined_at"]
    assert resolved["roles"][str(manager)]["name"] == "manager"
    tester_permissions = interaction.payload["member"]["permissions"]
    assert {k: resolved["channels"][str(art)][k] for k in ("id", "name", "type", "permissions")} == {
        "id": str(art),
        "name": "art",
        "type": 0,
        "permissions": tester_permissions,  # the invoker's permissions there, not the member option's
    }

    member, user, role, channel, where = (bot.seen[k] for k in ("member", "user", "role", "channel", "where"))
    assert isinstance(member, discord.Member) and (member.id, member.name) == (alice, "alice")
    assert [r.name for r in member.roles] == ["@everyone", "manager"] and member.guild_permissions.manage_guild
    assert member.resolved_permissions is not None and member.resolved_permissions.manage_guild
    assert isinstance(user, discord.Member) and user.id == alice  # a discord.User parameter gets a Member
    assert isinstance(role, discord.Role) and (role.id, role.name) == (manager, "manager")
    assert role.permissions.manage_guild and not role.permissions.administrator
    assert isinstance(channel, discord.TextChannel) and (channel.id, channel.name) == (art, "art")
    assert isinstance(where, app_commands.AppCommandChannel) and (where.id, where.name) == (voice, "lounge")
    assert where.type is discord.ChannelType.voice and where.permissions.value == int(tester_permissions)
    assert isinstance(bot.seen["target"], discord.Role) and bot.seen["target"].id == manager

    values |= {"target": alice}
    await (await server.slash("inspect", values)).wait_message()
    assert isinstance(bot.seen["target"], discord.Member) and bot.seen["target"].id == alice
    assert set(server.interactions[-1].payload["data"]["resolved"]) == {"users", "members", "roles", "channels"}

    assert await server.autocomplete("inspect", {"member": alice, "note": "x"}, focused="note") == []
    assert "resolved" not in server.interactions[-1].payload["data"]  # Discord resolves nothing for autocomplete
    typed = bot.seen["typed_member"]
    assert type(typed) is discord.Object and typed.id == alice
    server.assert_no_violations()


async def test_user_role_and_channel_options_are_checked(server: FakeDiscord, bot: Bot) -> None:
    role = server.add_role("role")
    voice = server.add_channel("lounge", type=2)
    category = server.add_channel("stuff", type=4)
    user_id, channel_id = server.user_id, server.channel_id
    good = {"member": user_id, "user": user_id, "role": role, "channel": channel_id, "where": category}
    await (await server.slash("inspect", good)).wait_message()
    assert bot.seen["where"].type is discord.ChannelType.category and bot.seen["target"] is None
    assert server.commands["inspect"]["options"][3]["channel_types"] == [0, 5]
    for bad, match in [
        ({"member": 12345}, "no user 12345"),
        ({"user": role}, f"no user {role}"),
        ({"role": server.user_id}, f"no role {server.user_id}"),
        ({"channel": voice}, r"type 2, not in \[0, 5\]"),
        ({"where": 999}, "no channel 999"),
        ({"target": server.channel_id}, "no user or role"),
        ({"member": "alice"}, "takes the id of a user"),
        ({"role": True}, "takes the id of a role"),
    ]:
        with pytest.raises(ValueError, match=match):
            await server.slash("inspect", good | bad)
    with pytest.raises(ValueError, match="type 7"):
        server.add_channel("odd", type=7)
    with pytest.raises(ValueError, match="unknown roles"):
        server.add_user("ghost", roles=[424242])
    assert len(server.interactions) == 1


async def test_role_permissions_reach_interactions(server: FakeDiscord, bot: Bot) -> None:
    manager = server.add_role("manager", MANAGE_GUILD)
    boss = server.add_user("boss", roles=["manager"])
    plain = server.add_user("plain")
    admin = server.add_user("admin", roles=[server.add_role("admins", ADMINISTRATOR)])
    cases = [
        (boss, True, ["manager"]),
        (plain, False, []),
        (admin, True, ["admins"]),
        (server.user_id, False, []),  # the default tester is an ordinary member
        (server.owner_id, True, []),
    ]
    for user_id, manages, roles in cases:
        await (await server.slash("whoami", user_id=user_id)).wait_message()
        permissions, invoker = bot.seen["permissions"], bot.seen["invoker"]
        assert isinstance(invoker, discord.Member) and invoker.id == user_id
        assert permissions.manage_guild is manages, invoker.name
        assert [r.name for r in invoker.roles[1:]] == roles
        assert permissions == invoker.guild_permissions  # what Discord computed and what discord.py computes agree
    assert bot.seen["permissions"] == discord.Permissions.all()  # the owner's
    await (await server.slash("whoami", user_id=admin)).wait_message()
    assert bot.seen["permissions"] == discord.Permissions.all()

    server.set_roles(plain, [manager, "artist"])
    await (await server.slash("whoami", user_id=plain)).wait_message()
    assert bot.seen["permissions"].manage_guild and [r.name for r in bot.seen["invoker"].roles[1:]] == [
        "manager",
        "artist",
    ]
    server.set_roles(boss, [])
    await (await server.slash("whoami", user_id=boss)).wait_message()
    assert not bot.seen["permissions"].manage_guild and bot.seen["invoker"].roles[1:] == []
    with pytest.raises(LookupError):
        server.set_roles(12345, [])


async def test_set_roles_updates_the_member_cache(server: FakeDiscord) -> None:
    manager = server.add_role("manager", MANAGE_GUILD)
    plain = server.add_user("plain")
    intents = discord.Intents.default()
    intents.members = True
    client = discord.Client(intents=intents, guild_ready_timeout=0.1)
    updates: list[tuple[discord.Member, discord.Member]] = []

    @client.event
    async def on_member_update(before: discord.Member, after: discord.Member) -> None:
        updates.append((before, after))

    async with run_bot(client, server):
        guild = client.get_guild(server.guild_id)
        assert guild is not None
        member = guild.get_member(plain)
        assert member is not None and not member.guild_permissions.manage_guild
        server.set_roles(plain, [manager])
        await _eventually(lambda: updates)
        [(before, after)] = updates
        assert before.roles == [guild.default_role] and after.roles == [guild.default_role, guild.get_role(manager)]
        assert after is member and member.guild_permissions.manage_guild
        server.set_roles(server.bot_user_id, ["manager"])  # the bot's own member is cached with any intents
        await _eventually(lambda: guild.me.guild_permissions.manage_guild)


async def test_message_nonce_is_enforced(server: FakeDiscord, bot: Bot) -> None:
    channel = bot.get_channel(server.channel_id)
    assert isinstance(channel, discord.TextChannel)
    first = await channel.send("once", nonce="retry-1")
    again = await channel.send("once", nonce="retry-1")
    assert again.id == first.id and first.nonce == again.nonce == "retry-1"
    assert [m.id for m in server.messages(server.channel_id)] == [first.id]
    assert server.message(first.id).nonce == "retry-1"
    posts = [r for r in server.requests if r.method == "POST" and r.path == f"/channels/{server.channel_id}/messages"]
    assert [(r.json["nonce"], r.json["enforce_nonce"], r.status) for r in posts] == [("retry-1", True, 200)] * 2

    other = await channel.send("twice", nonce="retry-2")
    elsewhere_id = server.add_channel("elsewhere")
    await _eventually(lambda: bot.get_channel(elsewhere_id))
    elsewhere = bot.get_channel(elsewhere_id)
    assert isinstance(elsewhere, discord.TextChannel)
    moved = await elsewhere.send("once", nonce="retry-1")  # the same nonce in another channel is another message
    server.nonce_ttl = 0
    expired = await channel.send("once", nonce="retry-1")
    assert len({first.id, other.id, moved.id, expired.id}) == 4
    assert len(server.messages(server.channel_id)) == 3
    with pytest.raises(discord.HTTPException) as raised:
        await channel.send("long", nonce="x" * 26)
    assert raised.value.code == 50035


async def test_replies_need_their_message_unless_told_otherwise(server: FakeDiscord, bot: Bot) -> None:
    channel = bot.get_channel(server.channel_id)
    assert isinstance(channel, discord.TextChannel)
    parent = await channel.send("parent")
    reply = await channel.send("reply", reference=parent)
    assert reply.type is discord.MessageType.reply and reply.reference is not None
    assert reply.reference.message_id == parent.id and server.message(reply.id).type == 19
    await parent.delete()
    with pytest.raises(discord.HTTPException) as raised:
        await channel.send("orphan", reference=parent)
    assert raised.value.code == 50035
    plain = await channel.send("orphan", reference=parent.to_reference(fail_if_not_exists=False))
    assert plain.type is discord.MessageType.default and plain.reference is None


_KILLED_BOT = textwrap.dedent(
    """
    import sys, discord, yarl

    discord.http.Route.BASE = sys.argv[1]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(sys.argv[2])
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.1)
    client.run(sys.argv[3], log_handler=None)
    """
)


@pytest.mark.e2e
async def test_bot_killed_with_sigkill_then_another_connects(
    server: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_BOT, server.api_base_url, server.gateway_url, server.token
    )
    try:
        await server.wait_until_connected(timeout=20)
        process.kill()
        # Block the loop while the process dies, so the server writes to the dropped socket before it notices.
        time.sleep(0.3)  # noqa: ASYNC251
        for n in range(3):
            server.add_user(f"during-{n}")
            await asyncio.sleep(0)
        await process.wait()
        server.add_channel("after")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == -9
    async with run_bot(Bot(), server) as bot:
        assert bot.get_guild(server.guild_id) is not None
        interaction = await server.slash("secret")
        assert (await interaction.wait_message()).content == "hush"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    ended = [session.writer for session in server._sessions if session.writer.done()]
    assert not [w.exception() for w in ended if not w.cancelled() and w.exception() is not None]
    server.assert_no_violations()

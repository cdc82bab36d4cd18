"""An offline fake of Discord that the real discord.py client logs in to over sockets.

``FakeDiscord`` is an aiohttp app on 127.0.0.1 (a free port) serving the REST routes a slash-command bot uses,
the gateway websocket, and uploaded attachments. It works across processes: a bot in a subprocess can connect
to a server living in the test process, as long as that test's event loop keeps running.

Pointing a bot at it (both settings are process-global in discord.py):

- ``discord.http.Route.BASE = server.api_base_url`` (a ``str``, ``http://127.0.0.1:PORT/api/v10``). Every
  ``Route`` reads ``BASE`` when it is built, that is on each request, and the webhook adapter (interaction
  callbacks, followups, ``@original`` edits) builds its routes from the same class, so set it any time before
  ``login``/``start``. ``discord.http._set_api_version()`` overwrites ``BASE`` with ``https://discord.com/api/vN``;
  discord.py 2.7.1 never calls it itself, so it only runs if the bot calls it: then set ``BASE`` after that call.
- ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(server.gateway_url)`` (a ``yarl.URL``, not a
  ``str``: discord.py calls ``.with_query`` on it). A plain ``Client.connect`` never asks ``GET /gateway/bot``;
  ``AutoShardedClient`` does, and gets this URL and ``shards: 1``.
- Build the client with a small ``guild_ready_timeout`` (for example 0.1): discord.py waits that long after the
  last GUILD_CREATE before ``on_ready`` (default 2 s). Not 0, which races the GUILD_CREATE.

A command run in-process (``bot.__main__.main([...])``, which has its own ``asyncio.run``) logs in to a fake served
from another thread: ``with serve_in_thread() as server``.

In-process tests use ``point_discord_at(server)`` (restores both on exit) or ``run_bot(bot, server)``, which
also logs the bot in, waits for ``on_ready``, fails on ERROR records of the ``discord`` logger
(``capture_discord_errors``) and closes the bot before the server stops.

Rules the fake enforces record a ``Violation`` in ``server.violations`` and answer with Discord's status and code:
10062 (404) callback after ``ack_timeout`` (3 s) or to an unknown interaction; 40060 (400) second callback;
10015 (404) webhook use before acknowledgement; 50027 (401) unknown or expired (``interaction_token_ttl``) token;
50035 (400) content over 2,000 characters, over 10 embeds, over 5 rows or 5 items a row, custom_ids outside 1..100
characters or duplicated, autocomplete over 25 choices or names/values over 100 characters, bad command
definitions, a callback type invalid for the interaction; 50006 (400) empty message; 40005 (413) an attachment
over ``attachment_size_limit`` (Discord answers too-large uploads with 413, not 50035); 50035 a message nonce over
25 characters; 50008 (400) a message to a category. Routes the fake does not implement answer 404 and record a
``Violation`` with code 0.

Every message keeps its ``history``: a ``Revision`` (monotonic time at the fake, content, attachments) for its creation
and for each edit, so a test can see what a message showed over time and how far apart its edits came.

Discord behaviours it mimics: the first followup after a deferral (type 5) fills in the "thinking" message
instead of posting a new one, keeping the deferral's ephemeral flag; type 6/7 callbacks make the clicked message
the ``@original``; ephemeral messages are left out of ``server.messages(channel_id)`` unless asked for.
``POST /channels/{id}/messages`` with a ``nonce`` and ``enforce_nonce: true`` answers with the message the bot already
sent with that nonce in that channel within ``nonce_ttl`` (10 minutes) and creates nothing (discord.py's ``send``
always sends a random nonce with ``enforce_nonce``). A send with a ``message_reference`` is a reply (type 19) to a
message of that channel; a missing one fails it with 50035 unless ``fail_if_not_exists`` is false, which sends a plain
message. A bot that dies without closing (SIGKILL) just drops its
session: frames for it are discarded quietly, and the next bot to connect gets READY.

The guild: ``guild_id`` (also the id of @everyone), ``channel_id`` (``#general``), ``user_id`` (``tester``, the
default invoker, an ordinary member), ``owner_id`` (the guild owner, who has every permission), ``bot_user_id``.
``add_role(name, permissions)``, ``add_user(name, roles=..., permissions=...)`` (roles are ids or names; a missing
name is created), ``set_roles(user_id, roles)`` (sends GUILD_MEMBER_UPDATE, so a bot's member cache follows) and
``add_channel(name, nsfw, type=...)`` (0 text, 2 voice, 4 category, 5 announcement) change it while a bot is
connected. The ``permissions`` Discord computes for a member, and sends in interactions, are @everyone's, its roles'
and the ``permissions`` given to ``add_user`` (which discord.py's ``Member.guild_permissions`` cannot see: prefer
roles); Administrator or ownership gives everything (``discord.Permissions.all()``). Channels have no overwrites.

Slash command options are typed from the synced schema. User (6), channel (7), role (8) and mentionable (9) options
take the int id of something the fake knows; the option carries the id string and ``data.resolved`` carries
``users``, ``members`` (without ``user``, ``deaf``, ``mute``; ``permissions`` that member's), ``roles`` and
``channels`` (with the invoker's ``permissions``), as Discord sends them. Unknown ids, and channels of a type
outside the option's ``channel_types``, raise ``ValueError``. Autocomplete sends ids without ``resolved``, as Discord
does, so discord.py hands the callback a ``discord.Object``.
"""

from __future__ import annotations

from ._harness import capture_discord_errors, point_discord_at, run_bot, serve_in_thread
from ._models import Attachment, FakeInteraction, Message, RecordedRequest, Revision, Violation
from ._server import FakeDiscord

__all__ = [
    "Attachment",
    "FakeDiscord",
    "FakeInteraction",
    "Message",
    "RecordedRequest",
    "Revision",
    "Violation",
    "capture_discord_errors",
    "point_discord_at",
    "run_bot",
    "serve_in_thread",
]

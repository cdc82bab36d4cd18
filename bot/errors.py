"""Expected failures, each with a message ready to show the user."""

from __future__ import annotations


class BotError(Exception):
    """An expected failure whose message can be shown to the user as is."""


class ConfigError(BotError):
    """A setting is missing or wrong; the message names the file and the key."""


class StorageError(ConfigError):
    """The database file cannot be opened or used; the message names the file, the setting and the fix."""


class DatabaseVersionError(BotError):
    """The database's schema is newer than this bot knows, or older than a reader that must not migrate it can use."""


class PromptRejected(BotError):
    """A prompt broke a rule of the prompt language."""


class QueueFull(BotError):
    """The generation queue is at capacity."""


class JobNotFound(BotError):
    """A button or command names a job the database does not hold."""


class ModelError(ConfigError):
    """The model could not be loaded from the configured place."""


class HubUnreachable(BotError):
    """The Hugging Face hub cannot be reached and the model is not in the local cache: not a setting to fix."""


class JobCancelled(BotError):
    """A job was withdrawn before its images were delivered; the message says by whom and why."""


class Refused(BotError):
    """A request broke a rule of the server: a ban, a channel rule, a pause or a limit."""


class OutOfMemory(BotError):
    """The GPU ran out of memory for a batch; a smaller batch may fit."""


class RenderFailed(BotError):
    """A batch could not be rendered; the message says why."""


class UnknownNamespace(BotError):
    """A name given as a namespace is none users steer with; ``suggestion`` is the likeliest meant, if any."""

    def __init__(self, message: str, *, suggestion: str | None) -> None:
        super().__init__(message)
        self.suggestion = suggestion


class RevisionUnserved(BotError):
    """A job asked for a model revision no worker serves (not the production one, nor a configured candidate)."""

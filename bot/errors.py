"""Expected failures, each with a message ready to show the user."""

from __future__ import annotations


class BotError(Exception):
    """An expected failure whose message can be shown to the user as is."""


class ConfigError(BotError):
    """A setting is missing or wrong; the message names the file and the key."""


class PromptRejected(BotError):
    """A prompt broke a rule of the prompt language."""


class QueueFull(BotError):
    """The generation queue is at capacity."""


class JobNotFound(BotError):
    """A button or command names a job the database does not hold."""


class ModelError(ConfigError):
    """The model could not be loaded from the configured place."""

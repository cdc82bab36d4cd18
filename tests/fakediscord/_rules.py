"""Discord's limits on what a bot may send, checked the way the real API answers."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from ._models import COMPONENTS_V2, walk_components

_NAME = re.compile(r"^[-_\w]{1,32}$")


class Refusal(Exception):
    """An error answer: HTTP status, Discord JSON code, message and optional form errors."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors

    def body(self) -> dict[str, Any]:
        """Return the JSON body Discord sends with this error."""
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def invalid_form(where: str, error_code: str, message: str) -> Refusal:
    """Return a 50035 Invalid Form Body refusal naming the field, as Discord nests it."""
    errors: dict[str, Any] = {"_errors": [{"code": error_code, "message": message}]}
    for part in reversed(where.split(".")):
        errors = {part: errors}
    return Refusal(400, 50035, f"Invalid Form Body ({where}: {message})", errors)


def check_message(body: dict[str, Any]) -> None:
    """Refuse content, embeds and components Discord would refuse."""
    content = body.get("content")
    if isinstance(content, str) and len(content) > 2000:
        raise invalid_form("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
    embeds = body.get("embeds") or []
    if len(embeds) > 10:
        raise invalid_form("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    total = 0
    for index, embed in enumerate(embeds):
        for key, limit in (("title", 256), ("description", 4096)):
            if len(embed.get(key) or "") > limit:
                raise invalid_form(f"embeds.{index}.{key}", "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer.")
        if len(embed.get("fields") or []) > 25:
            raise invalid_form(f"embeds.{index}.fields", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        total += len(embed.get("title") or "") + len(embed.get("description") or "")
        total += sum(len(f.get("name", "")) + len(f.get("value", "")) for f in embed.get("fields") or [])
    if total > 6000:
        raise invalid_form("embeds", "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
    check_components(body.get("components") or [], body.get("flags") or 0)


def check_components(components: list[dict[str, Any]], flags: int) -> None:
    """Refuse more than 5 rows, more than 5 items a row, bad custom_ids and duplicates."""
    if not flags & COMPONENTS_V2:
        if len(components) > 5:
            raise invalid_form("components", "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
        for row_index, row in enumerate(components):
            where = f"components.{row_index}"
            if row.get("type") != 1:
                raise invalid_form(f"{where}.type", "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "Top level must be a row.")
            items = row.get("components") or []
            if not 1 <= len(items) <= 5:
                raise invalid_form(f"{where}.components", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length.")
            if len(items) > 1 and any(item.get("type") in (3, 5, 6, 7, 8) for item in items):
                raise invalid_form(where, "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "A select menu needs a row of its own.")
    for component in walk_components(components):
        custom_id = component.get("custom_id")
        if component.get("type") == 2 and component.get("style") == 5:
            if custom_id is not None or not component.get("url"):
                raise invalid_form("components", "BUTTON_COMPONENT_INVALID", "A link button has a url, no custom_id.")
        elif component.get("type") in (2, 3, 4, 5, 6, 7, 8) and custom_id is None:
            raise invalid_form("components", "BASE_TYPE_REQUIRED", "custom_id: This field is required")
        if custom_id is not None and not 1 <= len(custom_id) <= 100:
            raise invalid_form("components.custom_id", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
        if len(component.get("label") or "") > 80:
            raise invalid_form("components.label", "BASE_TYPE_MAX_LENGTH", "Must be 80 or fewer in length.")
    ids = Counter(c["custom_id"] for c in walk_components(components) if c.get("custom_id") is not None)
    duplicated = [custom_id for custom_id, count in ids.items() if count > 1]
    if duplicated:
        raise invalid_form(
            "components", "COMPONENT_CUSTOM_ID_DUPLICATED", f"Component custom id {duplicated[0]!r} is duplicated"
        )


def check_choices(choices: list[dict[str, Any]]) -> None:
    """Refuse autocomplete answers over 25 choices or with names or values over 100 characters."""
    if len(choices) > 25:
        raise invalid_form("data.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    for index, choice in enumerate(choices):
        if not 1 <= len(str(choice.get("name", ""))) <= 100:
            raise invalid_form(f"data.choices.{index}.name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100.")
        value = choice.get("value")
        if isinstance(value, str) and len(value) > 100:
            raise invalid_form(f"data.choices.{index}.value", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer.")


def check_commands(commands: list[dict[str, Any]]) -> None:
    """Refuse application command definitions Discord would refuse on a bulk overwrite."""
    if len(commands) > 100:
        raise invalid_form("commands", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
    for index, command in enumerate(commands):
        chat_input = command.get("type", 1) == 1
        _check_named(command, f"{index}", chat_input=chat_input)
        _check_options(command.get("options") or [], f"{index}.options")


def _check_named(entry: dict[str, Any], where: str, *, chat_input: bool = True) -> None:
    name = entry.get("name", "")
    if chat_input and (not _NAME.match(name) or name != name.lower()):
        raise invalid_form(f"{where}.name", "APPLICATION_COMMAND_INVALID_NAME", f"Command name is invalid: {name!r}")
    description = entry.get("description", "")
    if chat_input and not 1 <= len(description) <= 100:
        raise invalid_form(f"{where}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")


def _check_options(options: list[dict[str, Any]], where: str) -> None:
    if len(options) > 25:
        raise invalid_form(where, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    seen_optional = False
    for index, option in enumerate(options):
        _check_named(option, f"{where}.{index}")
        if option.get("required"):
            if seen_optional:
                raise invalid_form(f"{where}.{index}", "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID", "Required first")
        elif option.get("type") not in (1, 2):
            seen_optional = True
        if len(option.get("choices") or []) > 25:
            raise invalid_form(f"{where}.{index}.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        _check_options(option.get("options") or [], f"{where}.{index}.options")

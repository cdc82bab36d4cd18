"""Text that people typed (moderators' reasons, blocked terms) made inert for a Discord message.

Shown as written, on one line, it formats nothing, links nowhere, mentions nobody and cannot close the markup
around it (a spoiler, a bold title). Messages still go out with no allowed mentions: this is what people read.
"""

from __future__ import annotations

import re

# The characters Discord's markdown gives a meaning to anywhere (a masked link needs its brackets, a mention or an
# emoji its angle bracket), and those that mean something at the start of a line (heading, quote, list, subtext);
# a backslash before one shows it as it is.
_MARKUP = re.compile(r"[\\*_~|`\[\]<]|^[#>-]")
# What Discord turns into a mention even without the angle brackets; a zero-width space after the @ stops it.
_MENTION = re.compile(r"@(?=everyone|here|[!&]?\d)")


def inert(text: str) -> str:
    """Return ``text`` on one line with its markdown and mentions escaped, so Discord shows it literally."""
    text = " ".join(text.split())
    return _MENTION.sub("@\u200b", _MARKUP.sub(lambda match: "\\" + match[0], text))

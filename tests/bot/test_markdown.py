from __future__ import annotations

from bot.markdown import inert


def test_typed_text_is_shown_literally_on_one_line() -> None:
    hostile = "# Free [Nitro](https://evil.example) **now** ||x|| `y` ~~z~~ a_b <@123> <#5> @everyone @here\n> quote"
    shown = inert(hostile)
    assert shown == (
        r"\# Free \[Nitro\](https://evil.example) \*\*now\*\* \|\|x\|\| \`y\` \~\~z\~\~ a\_b \<@"
        "\u200b"
        r"123> \<#5> @"
        "\u200beveryone @\u200bhere > quote"
    )
    assert inert("off-topic (see the rules): spam, 3 times") == "off-topic (see the rules): spam, 3 times"
    assert inert("-# small") == r"\-# small" and inert(r"a\*b") == r"a\\\*b"

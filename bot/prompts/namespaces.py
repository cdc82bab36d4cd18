"""The namespaces of the Imaginary Network Expanded (INE) tags Sygil Diffusion was trained on."""

from __future__ import annotations

# What an image shows: users steer the model with these.
CONTENT = frozenset(
    {
        "species",
        "studio",
        "series",
        "character",
        "creator",
        "person",
        "medium",
        "meta",
        "clothing",
        "gender",
        "rating",
        "genre",
        "meme",
        "year",
        "action",
        "bodypart",
    }
)

# Where an image came from: in the data, but not something to steer with.
PROVENANCE = frozenset(
    {"title", "subreddit", "uploader", "booru", "category", "text", "pixiv work", "website", "source"}
)

# Hydrus tagging guidelines, which the data follows, rename these.
ALIASES = {"artist": "creator", "copyright": "series", "franchise": "series"}

KNOWN = CONTENT | PROVENANCE

# `rating:` values that steer away from mature content; any other rating needs an age-restricted channel.
SAFE_RATINGS = frozenset({"safe", "general", "sfw"})

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

# The content namespace to describe a picture with instead of a provenance one (`meta:` for the rest).
STEER_INSTEAD = {"title": "series", "pixiv work": "series", "category": "meta", "text": "meta"}

# `rating:` values that steer away from mature content; any other rating needs an age-restricted channel.
SAFE_RATINGS = frozenset({"safe", "general", "sfw"})

# What each content namespace means, said to users by `/tags`.
DESCRIPTIONS = {
    "species": "what kind of creature is shown (`species:seal` is the animal, not the singer)",
    "studio": "the company that made or owns the work (`studio:dc` is DC Comics, not Washington DC)",
    "series": "the franchise, show, game or book series",
    "character": "a named fictional character",
    "creator": "the artist or photographer whose style to follow (`artist:` is read as `creator:`)",
    "person": "a real, named person",
    "medium": "how the picture is made: oil painting, photograph, 3d render…",
    "meta": "facts about the image itself: resolution, official art, sketch…",
    "clothing": "what the subjects wear",
    "gender": "the gender of the subjects",
    "rating": "how mature the content is; only `safe` outside age-restricted channels",
    "genre": "the genre or mood: fantasy, cyberpunk, horror…",
    "meme": "a known internet meme",
    "year": "the year the work is from",
    "action": "what the subjects are doing",
    "bodypart": "a body part to show: wings, tail, hands…",
}

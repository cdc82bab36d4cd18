"""Images from untrusted bytes: an init image a user sent, a result a remote worker sent; PNGs only, their size read
from the header before any decoding."""

from __future__ import annotations

import io
import struct
import warnings

from PIL import Image, UnidentifiedImageError

from bot.errors import BotError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_INIT_SIDE = 2048  # pixels, each way: a variation's source is at most 2048x2048
_BOMB = "That image is a decompression bomb: a variation starts only from an ordinary PNG."
_DAMAGED = "That PNG image is damaged and cannot be read."


class BadImage(BotError):
    """An init image is not a PNG, is too large, or cannot be decoded; the message says which."""


def init_image_size(data: bytes) -> tuple[int, int]:
    """Return a PNG's width and height from its header, or raise BadImage before anything is decoded."""
    # A PNG starts with its signature, then the IHDR chunk: length 13, type, width and height as big-endian ints.
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        raise BadImage("That image is not a PNG: a variation starts only from a PNG image.")
    width, height = struct.unpack(">II", data[16:24])
    if not (0 < width <= MAX_INIT_SIDE and 0 < height <= MAX_INIT_SIDE):
        raise BadImage(
            f"That image is {width}×{height} pixels: a variation starts only from a PNG of at most "
            f"{MAX_INIT_SIDE}×{MAX_INIT_SIDE}."
        )
    return width, height


def open_init_image(data: bytes) -> Image.Image:
    """Decode an init image: a PNG of at most 2048x2048 pixels, refusing decompression bombs; raise BadImage."""
    init_image_size(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG"])
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(_BOMB) from None
    except ValueError as error:  # also how Pillow refuses a compressed text chunk that inflates past its limit
        raise BadImage(_BOMB if "too large" in str(error) else _DAMAGED) from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, struct.error):
        raise BadImage(_DAMAGED) from None
    return image


def check_rendered(data: object, *, width: int, height: int, max_bytes: int) -> str | None:
    """Check an image a remote worker sent back before anyone sees it: bytes of at most ``max_bytes``, a PNG that
    decodes, of the requested ``width`` by ``height``. Return None when it passes, else why not (for the log)."""
    if not isinstance(data, bytes):
        return f"not bytes but {type(data).__name__}"
    if len(data) > max_bytes:
        return f"{len(data)} bytes, over the limit of {max_bytes}"
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        return "not a PNG"
    size = struct.unpack(">II", data[16:24])
    if size != (width, height):
        return f"{size[0]}×{size[1]} pixels where {width}×{height} were asked for"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                image.load()
    except Exception as error:  # whatever Pillow raises for bytes it cannot decode
        return f"a PNG that does not decode ({type(error).__name__})"
    return None

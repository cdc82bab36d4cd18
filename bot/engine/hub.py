"""The Hugging Face hub: tell "it cannot be reached and the model is not in the cache" from other failures.

Nothing here imports torch or diffusers, so the prompt checker can ask too.
"""

from __future__ import annotations

import os
import socket

# Raised somewhere in the chain of a load that could not reach the hub: httpx's and requests' transport errors,
# huggingface_hub's own (offline mode, or "not in the cache after the hub failed"), and the socket's.
_NETWORK_ERRORS = frozenset(
    {
        "ConnectError",
        "ConnectTimeout",
        "ConnectionError",
        "LocalEntryNotFoundError",
        "NetworkError",
        "OfflineModeIsEnabled",
        "ProxyError",
        "ReadTimeout",
        "TimeoutException",
        "TransportError",
    }
)


def offline() -> bool:
    """Return whether the environment forbids reaching the hub (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def home() -> str:
    """Return the HF_HOME the hub library uses (its cache is under it)."""
    from huggingface_hub import constants

    return constants.HF_HOME


def cached(model_id: str, filename: str, revision: str = "main") -> bool:
    """Return whether ``filename`` of the hub model ``model_id`` at ``revision`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, filename, revision=revision), str)
    except ValueError:  # not a valid repo id: it cannot be cached either
        return False


def snapshot(model_id: str, folder: str, revision: str = "main") -> str:
    """Return the local path of one folder of a hub model, downloading it unless it is cached.

    One listing of the repository, not a request per file: without a network it fails at once, where
    ``from_pretrained`` of a hub id retries each file it looks for with backoff, for minutes.
    """
    from huggingface_hub import snapshot_download

    return os.path.join(snapshot_download(model_id, revision=revision, allow_patterns=[f"{folder}/*"]), folder)


def unreachable(error: BaseException) -> bool:
    """Return whether a failed load failed because the hub could not be reached (or may not be)."""
    if offline():
        return True
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError | socket.gaierror):
            return True
        if any(kind.__name__ in _NETWORK_ERRORS for kind in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


def not_cached_text() -> str:
    """Say that the hub cannot be reached and the model is not cached, and where the cache is."""
    return f"cannot reach the Hugging Face hub and the model is not in the cache (HF_HOME={home()})"


def download_hint() -> str:
    """Say how to get a model that is not cached."""
    if offline():
        return (
            "HF_HUB_OFFLINE is set: unset it once on a host that can reach the hub to download the model, or set "
            "model.id to a local folder"
        )
    return (
        "Download it once from a host with network access (check the network or proxy), or set model.id to a local "
        "folder"
    )

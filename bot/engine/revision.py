"""Name the exact weights a model id loaded: a hub commit, or a content hash of a local folder's weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_CHUNK = 1 << 20


def folder_revision(folder: Path) -> str:
    """Return ``sha256:`` and the hash of every weight file in a model folder (names and contents, in order).

    Two folders with the same weights get the same revision wherever they lie; changing any weight changes it.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def snapshot_revision(loaded_from: str) -> str | None:
    """Return the commit of a hub download, read from its cache path (``…/snapshots/<commit>``), if it is one."""
    path = Path(loaded_from)
    if path.parent.name == "snapshots" and len(path.name) == 40:
        return path.name
    return None


def names_folder(candidate: str) -> bool:
    """Return whether a candidate revision (``model.candidates``) names a local model folder rather than a branch,
    tag or commit of the model id: a folder that exists, or a path that is absolute or starts with ``.`` or ``~``."""
    path = Path(candidate).expanduser()
    return path.is_dir() or path.is_absolute() or candidate.startswith((".", "~"))


def tag(revision: str) -> str:
    """Return a short form of an exact revision safe in a Redis key: ``sha256:`` becomes ``sha256-``, 12 digits."""
    return short(revision).replace(":", "-")


def short(revision: str) -> str:
    """Return a revision short enough to show: 12 hex digits of a commit or a hash."""
    kind, _, value = revision.rpartition(":")
    return f"{kind}:{value[:12]}" if kind else value[:12]

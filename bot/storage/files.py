"""What the bot keeps on disk is readable by its own user only: the database holds live interaction tokens, and the
kept images are its users' pictures."""

from __future__ import annotations

import errno
import os
from pathlib import Path

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def private_folder(path: Path) -> None:
    """Create ``path`` and each missing folder above it with mode 0700; leave folders that exist as they are."""
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        if folder.exists():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=FOLDER_MODE, exist_ok=True)


def create_private(path: Path) -> bool:
    """Create ``path`` as an empty file with mode 0600 unless it exists; return whether it was created."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    os.close(descriptor)
    return True


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``; a new file gets mode 0600."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)

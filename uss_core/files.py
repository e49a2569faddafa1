"""Atomic file output: a crash never leaves a half-written file under its final name.

Writers put their bytes into a temporary sibling (same folder, so the final rename stays on one
file system and is atomic), then ``os.replace`` it over the final name.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary name in ``path``'s folder (which is created if needed).

    The file itself is not created, so whoever writes it creates it with the usual permissions
    (``mkstemp`` would make it owner-only, and the rename would keep that).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is deleted."""
    path = Path(path)
    temp = temporary_sibling(path)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)

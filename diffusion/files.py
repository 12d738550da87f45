"""Files written whole or not at all, and hashed in blocks: what the sampling job and the weight
converter write and record."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX):
    a killed write leaves no ``path``. The name carries the host and process, so processes of several
    nodes writing beside each other never share one."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    """``np.savez`` of ``arrays`` to ``path`` through :func:`write_atomic` (uncompressed: members stay
    seekable, which the evaluation's slice reader relies on)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the name
            np.savez(f, **arrays)

    write_atomic(path, write)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()

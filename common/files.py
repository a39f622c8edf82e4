"""Files written whole or not at all, and the identity of a file on disk."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# the mode `open()` would give a new file: mkstemp's own 0600 would hide caches from other users
_FILE_MODE = 0o666 & ~_umask()


def atomic_write(
    path: str | os.PathLike, content: bytes | str | Callable[[IO[bytes]], Any]
) -> Path:
    """Write `path` through a uniquely named temp file beside it, fsync, then rename: readers
    and other writers (DDP ranks, sweep workers) see the old file or the new one, never a part.

    `content` is the bytes or text to write, or a function that writes to the open binary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{socket.gethostname()}-{os.getpid()}"  # for `remove_stale_temps`
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as file:
            if callable(content):
                content(file)
            else:
                file.write(content.encode() if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Remove the temp files that killed processes of this machine left in `folder` (a writer's
    host and pid are in its temp file's name); returns how many."""
    host = socket.gethostname()
    removed = 0
    for tmp in Path(folder).glob(f".*.{host}-*.tmp"):
        pid = tmp.name.rsplit(f".{host}-", 1)[1].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed += 1
        except OSError:
            pass  # another user's live process
    return removed


def write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> Path:
    """`atomic_write` of `data` as JSON (`dumps`: `json.dumps` options, default indent 2)."""
    return atomic_write(path, json.dumps(data, **{"indent": 2, **dumps}))


def file_key(*paths: str | os.PathLike) -> str:
    """A 16-hex key of where the files are and what they hold (absolute path, size and mtime in
    ns of each): a replaced or regenerated file gets another key. A missing file counts by name."""
    parts = []
    for path in paths:
        try:
            st = os.stat(path)
            parts.append(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(str(path))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

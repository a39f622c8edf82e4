"""Files written whole or not at all, and the identity of a file on disk."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Sequence
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
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{process_tag()}.", suffix=".tmp", dir=path.parent
    )
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


def process_tag() -> str:
    """`<host>-<pid>`, put after a dot in the names of temp files and folders, so that a later
    run can tell those of killed processes (`left_by_dead_process`)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def left_by_dead_process(name: str) -> bool:
    """Whether `name` carries the `process_tag` of a process of this machine that is gone (not
    of a running one, nor of another machine sharing the disk)."""
    _, found, rest = name.rpartition(f".{socket.gethostname()}-")
    pid = re.match(r"\d+", rest) if found else None
    if pid is None:
        return False
    try:
        os.kill(int(pid.group()), 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # another user's live process
    return False


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Remove the temp files that killed processes of this machine left in `folder`; returns
    how many."""
    stale = [tmp for tmp in Path(folder).glob(".*.tmp") if left_by_dead_process(tmp.name)]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> Path:
    """`atomic_write` of `data` as JSON (`dumps`: `json.dumps` options, default indent 2)."""
    return atomic_write(path, json.dumps(data, **{"indent": 2, **dumps}))


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    """`atomic_write` of `rows` as CSV with a header of `columns`."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, text.getvalue())


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


def load_torch_file(path: str | os.PathLike, what: str, todo: str, **kwargs: Any) -> Any:
    """`torch.load(path, map_location="cpu", **kwargs)`; a file torch cannot read (empty,
    truncated, not a torch file) is a ConfigError: "`what` is not readable (torch's first
    line); `todo`"."""
    import pickle
    import zipfile

    import torch

    from common.errors import ConfigError

    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise ConfigError(f"{what} is not readable ({first}); {todo}") from None

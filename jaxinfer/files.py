"""Writing files whole or not at all, with the mode open() would give them.

Shared by checkpoint writing (`checkpoint.hf_write`) and training runs (`train.run_files`), so
that neither package imports the other for it. A kill, a full disk or a power cut must leave the
old file or the new one, never a truncated one.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask. os.umask reads it only by setting it, so it is set back at once (to
    the most private value meanwhile, in case another thread creates a file)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the umask. Files written through a temporary
    file (mkstemp: 0o600) or by libraries that choose their own mode get this one instead, so
    every file a save writes is as readable as the JSON files beside it."""
    return 0o666 & ~_umask()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace the file at `path` with `text` in one step: written to a temporary file beside it,
    flushed to disk, then renamed over it (os.replace is atomic), so a crash leaves the old
    file or the new one, never a truncated one. The file keeps its mode, or a new one gets what
    open() would give it (0o666 less the umask), not mkstemp's owner-only 0o600."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, value: Any) -> None:
    """`value` as indented JSON, atomically (`write_atomic`)."""
    write_atomic(path, json.dumps(value, indent=2) + "\n")

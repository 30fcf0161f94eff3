"""Small JSON files: read leniently, written atomically; and the fsync that durable writes share.

One implementation for run folders (config.json, run.json), dataset folders (meta.json) and
caches: a reader that crashes never finds half a file, because every write goes to a temporary
file beside the target first and is renamed over it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path`; {} when it is missing, unreadable, damaged or not an object.

    For records whose absence is normal (a run's run.json before its first save, a cache entry).
    Files whose damage must be reported (a dataset's meta.json) are read strictly by their owners.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON: a temporary file in the same folder, then one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry to disk (a folder: so that a rename into it survives a power
    loss); silently nothing where the platform or file system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

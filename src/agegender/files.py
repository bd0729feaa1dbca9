"""Writing artifacts so a crash never leaves half of one, and naming file content.

Every stage builds its output folder in a staging folder beside it and renames it into
place only when all of it is written (`atomic_dir`); single files are written the same
way (`write_json`). Staging names start with a dot, beside the target, so the rename
stays on one filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on success it replaces `path`, on any error it is removed.

    The previous folder is moved aside before the new one is renamed in, so `path` is
    missing only between two renames, never half-written. Staging folders that a killed
    run left behind are removed first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}-*"):  # left by a run that was killed (no cleanup runs then)
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    old = staging.with_name(staging.name + "-old")
    try:
        yield staging
        if path.exists():
            path.rename(old)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON; readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would differ from every other artifact's.
    tmp = path.with_name(f".{path.name}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_md5(path: Path) -> str:
    """The md5 of a file's bytes: how the dataset recognises the same image under another name."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()

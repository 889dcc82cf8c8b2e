"""Where edgemed keeps what it makes outside output folders: models, logs, probe verdicts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """``$EDGEMED_HOME`` or ``~/.cache/edgemed``."""
    return Path(os.environ.get("EDGEMED_HOME", Path.home() / ".cache" / "edgemed"))


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock named ``name`` under the cache while a shared cache entry is built or probed.

    Two edgemed processes on one workstation (a serve and an export, or two test workers) may otherwise build the
    same embedded model or probe folder at once; the second's rename would pull the folder from under the first.
    ``fcntl.flock`` is released by the kernel if the holder dies, so a killed builder never leaves a stale lock.
    """
    import fcntl

    folder = cache_root() / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

"""Where edgemed keeps what it makes outside output folders: models, logs, probe verdicts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EDGEMED_HOME`` or ``~/.cache/edgemed``."""
    return Path(os.environ.get("EDGEMED_HOME", Path.home() / ".cache" / "edgemed"))

"""What a person sees: edgemed's own lines and bars on the terminal, library noise in a log file.

The CLI calls :func:`setup` once. Unless ``--verbose``, file descriptor 2 is pointed at the log, so whatever
transformers, bitsandbytes, torch.onnx, onnxruntime or llama.cpp print (Python or C) lands there, and edgemed's own
output goes to :func:`user_err`, a copy of the terminal's stderr made before the switch. Warnings raised by
edgemed itself (``EdgemedWarning``) are shown as one ``warning:`` line; everyone else's go to the log.
``faulthandler`` writes the Python stack of a native crash to the log, where the supervisor reads what died.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_USER: IO[str] | None = None
_LOG: Path | None = None
_FAULT_FILE: IO[str] | None = None

# set before the libraries are imported: they read these once
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "ORT_LOGGING_LEVEL": "3",
    "TOKENIZERS_PARALLELISM": "false",
}


def user_err() -> IO[str]:
    """The stream for edgemed's own messages and progress bars (the terminal, even when fd 2 is the log)."""
    return _USER or sys.stderr


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Send edgemed's own progress bars and messages nowhere while inside (work the user did not ask to watch)."""
    global _USER
    before = _USER
    with open(os.devnull, "w") as null:
        _USER = null
        try:
            yield
        finally:
            _USER = before


def log_path() -> Path | None:
    """The log file of this command, once :func:`setup` ran."""
    return _LOG


def new_log_path(command: str) -> Path:
    from edgemed.paths import cache_root

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return cache_root() / "logs" / f"{command}-{stamp}-{os.getpid()}.log"


def setup(log: Path, verbose: bool = False) -> Path:
    """Send library output to ``log`` (unless verbose) and native-crash stacks there too; idempotent."""
    global _USER, _LOG, _FAULT_FILE
    if _LOG is not None:
        return _LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    _LOG = log
    for k, v in QUIET_ENV.items():
        if not verbose:
            os.environ.setdefault(k, v)
    _FAULT_FILE = open(log, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    faulthandler.enable(file=_FAULT_FILE, all_threads=True)
    handler = logging.StreamHandler(_FAULT_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    if verbose:
        return log
    sys.stderr.flush()
    _USER = io.TextIOWrapper(os.fdopen(os.dup(2), "wb", buffering=0), write_through=True,
                             encoding=getattr(sys.stderr, "encoding", None) or "utf-8", errors="replace")
    os.dup2(_FAULT_FILE.fileno(), 2)
    sys.stderr = _FAULT_FILE
    warnings.showwarning = _showwarning
    return log


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    from edgemed.errors import EdgemedWarning

    if issubclass(category, EdgemedWarning):  # edgemed's own warnings are meant for the user
        print(f"warning: {message}", file=user_err(), flush=True)
    if _FAULT_FILE is not None:
        _FAULT_FILE.write(warnings.formatwarning(message, category, filename, lineno, line))

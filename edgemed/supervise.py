"""A command that dies in native code never takes the terminal down silently.

``edgemed CMD ...`` runs CMD in a child interpreter and waits. When the child is killed by a signal (SIGILL from a
kernel this CPU cannot run, SIGSEGV, SIGBUS...), the parent prints one line: which runtime died (read from the
Python stack that faulthandler wrote to the command's log), the signal, and what to do. Output folders are written
under temporary names (edgemed.artifacts.atomic_dir), so a killed step leaves nothing that looks complete.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from edgemed.probe import describe_exit

ENV = "EDGEMED_SUPERVISED"  # set in the child: run the command itself
LOG_ENV = "EDGEMED_LOG"
RUNTIMES = (("llama_cpp", "llama.cpp"), ("onnxruntime", "onnxruntime"), ("bitsandbytes", "bitsandbytes"),
            ("torch", "PyTorch"), ("transformers", "PyTorch (transformers)"), ("PIL", "Pillow"),
            ("pydicom", "pydicom"), ("numpy", "numpy"))
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+) in (\S+)')


def crash_site(log: Path | None) -> tuple[str, str | None]:
    """(runtime, edgemed frame) of the last native crash stack in ``log``: what the innermost frames belong to."""
    if log is None or not log.is_file():
        return "a native library", None
    text = log.read_text(errors="replace")
    start = max(text.rfind("Fatal Python error"), 0)
    frames = [_FRAME.match(line) for line in text[start:].splitlines()]
    frames = [m for m in frames if m]
    runtime, mine = "a native library", None
    for m in frames:  # most recent call first
        path = m.group(1).replace("\\", "/")
        if runtime == "a native library":
            for part, name in RUNTIMES:
                if f"/{part}/" in path:
                    runtime = name
                    break
        if mine is None and "/edgemed/" in path:
            mine = f"edgemed/{path.rsplit('/edgemed/', 1)[1]}:{m.group(2)} in {m.group(3)}"
    return runtime, mine


def crash_message(command: str, rc: int, log: Path | None) -> str:
    """The one line a user sees when the child died by signal ``-rc``."""
    runtime, mine = crash_site(log)
    where = f" (in {mine})" if mine else ""
    hint = ("this CPU could not run an instruction that the runtime chose for it" if -rc == signal.SIGILL
            else "the runtime crashed")
    logs = f"; the log is {log}" if log else ""
    return (f"error: edgemed {command}: {runtime} {describe_exit(rc)}{where}: {hint}. Run `edgemed doctor` to see "
            f"which runtime paths work on this machine{logs}")


def run(child_argv: list[str], command: str, log: Path) -> int:
    """Run ``child_argv`` with the supervised flag and the log path set; return the exit code to leave with."""
    env = {**os.environ, ENV: "1", LOG_ENV: str(log)}
    p = subprocess.Popen(child_argv, env=env)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child through the process group
    old_term = signal.signal(signal.SIGTERM, lambda s, f: p.send_signal(s))
    try:
        rc = p.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if rc >= 0:
        return rc
    if -rc in (signal.SIGINT, signal.SIGTERM):
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130
    print(crash_message(command, rc, log), file=sys.stderr)
    return 128 - rc

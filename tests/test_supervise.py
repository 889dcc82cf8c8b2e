"""A native crash in a command's child ends in one line naming the runtime, the signal and `edgemed doctor`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from edgemed import supervise

CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {fake!r})
    from edgemed import console
    console.setup(Path(os.environ["EDGEMED_LOG"]))
    print("library noise", file=sys.stderr)
    import llama_cpp  # the fake one below: dies in native code as llama.cpp's AMX kernel did
    llama_cpp.decode()
""")


def _fake_runtime(tmp_path: Path, how: str) -> Path:
    pkg = tmp_path / "fake" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"def decode():\n    {how}\n")
    return tmp_path / "fake"


def test_native_sigill_is_one_line_naming_runtime_signal_and_doctor(tmp_path, capfd):
    fake = _fake_runtime(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    log = tmp_path / "cmd.log"
    rc = supervise.run([sys.executable, "-c", CHILD.format(fake=str(fake))], "parity", log)
    err = capfd.readouterr().err
    assert rc == 128 + 4
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "llama.cpp killed by SIGILL (illegal instruction)" in lines[0]
    assert "edgemed doctor" in lines[0] and str(log) in lines[0]
    assert "Traceback" not in err and "library noise" not in err  # the noise went to the log
    assert "library noise" in log.read_text() and "Fatal Python error" in log.read_text()


def test_segfault_in_native_code_is_reported_too(tmp_path, capfd):
    fake = _fake_runtime(tmp_path, "import ctypes; ctypes.string_at(0)")
    rc = supervise.run([sys.executable, "-c", CHILD.format(fake=str(fake))], "eval", tmp_path / "c.log")
    err = capfd.readouterr().err
    assert rc == 128 + 11
    assert "error: edgemed eval: llama.cpp killed by SIGSEGV" in err


def test_clean_exit_codes_pass_through(tmp_path, capfd):
    assert supervise.run([sys.executable, "-c", "raise SystemExit(3)"], "x", tmp_path / "l.log") == 3
    assert capfd.readouterr().err == ""


def test_crash_site_without_a_stack_names_no_runtime(tmp_path):
    assert supervise.crash_site(None) == ("a native library", None)
    log = tmp_path / "l.log"
    log.write_text('Fatal Python error: Illegal instruction\n\nCurrent thread 0x1 (most recent call first):\n'
                   '  File "/x/site-packages/onnxruntime/capi/session.py", line 3 in run\n'
                   '  File "/x/edgemed/backends/onnx.py", line 9 in logits\n')
    assert supervise.crash_site(log) == ("onnxruntime", "edgemed/backends/onnx.py:9 in logits")


def test_edgemed_program_runs_commands_supervised_and_keeps_their_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("edgemed")
    r = subprocess.run([str(exe), "verify", str(tmp_path)], capture_output=True, text=True,
                       env={"EDGEMED_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("FAIL ") and "not an edgemed bundle" in r.stderr and "Traceback" not in r.stderr
    logs = list((tmp_path / "home" / "logs").glob("verify-*.log"))
    assert len(logs) == 1  # the supervised child kept a log of its own


def test_only_edgemeds_own_warnings_reach_the_terminal(tmp_path):
    code = textwrap.dedent("""
        import os, warnings
        from pathlib import Path
        from edgemed import console
        from edgemed.errors import EdgemedWarning
        console.setup(Path(os.environ["EDGEMED_LOG"]))
        warnings.warn("a library's FutureWarning", FutureWarning)
        warnings.warn("a library's UserWarning")
        warnings.warn("fell back to 32-bit LoRA", EdgemedWarning)
    """)
    log = tmp_path / "w.log"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**__import__("os").environ, "EDGEMED_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "warning: fell back to 32-bit LoRA"
    text = log.read_text()
    assert "a library's FutureWarning" in text and "a library's UserWarning" in text

"""`edgemed doctor`: exits 0 on a working machine and names the AMX decision; non-zero with the fix when a required
runtime is missing."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from edgemed.cli import main


def test_doctor_passes_here_and_names_the_amx_decision():
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0, r.output
    assert "llama.cpp kernels" in r.output and "AMX" in r.output
    assert "no outbound connection was attempted" in r.output
    assert "summary: " in r.output


def test_doctor_json_is_the_same_data_for_scripts():
    r = CliRunner().invoke(main, ["doctor", "--json"])
    data = json.loads(r.output)
    assert data["ok"] is True and data["outbound_attempts"] == []
    assert data["facts"]["llamacpp"]["mode"] in ("full", "no-amx", "plain")
    assert {c["name"] for c in data["checks"]} >= {"cpu", "memory", "disk", "torch", "onnxruntime", "gpu"}
    assert data["summary"].count(";") >= 3


def _doctor_without(module: str) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from edgemed.cli import main\nmain(['doctor'], prog_name='edgemed')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_doctor_fails_with_the_fix_when_a_required_runtime_is_missing():
    r = _doctor_without("onnxruntime")
    assert r.returncode == 1, r.stdout
    assert "FAIL onnxruntime" in r.stdout and "fix: pip install onnxruntime" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_doctor_fails_when_llama_cpp_is_missing():
    r = _doctor_without("llama_cpp")
    assert r.returncode == 1
    assert "fix: pip install llama-cpp-python" in r.stdout

"""The llama.cpp probe: fast paths only where a child process proved they run, cached per CPU and build."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgemed import probe


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path))
    monkeypatch.setattr(probe, "build_probe_files", lambda folder: folder)
    monkeypatch.setattr(probe, "_MODE", None)
    monkeypatch.setattr(probe, "_BUILT", [])  # as if nothing was dropped yet (a llama.cpp test may have run first)
    monkeypatch.delenv("EDGEMED_LLAMACPP_MODE", raising=False)
    return tmp_path


def _dies_by(sig: str):
    """A real child that is killed by ``sig``, as llama.cpp's AMX kernel is on some Xeons."""
    return probe.describe_exit(subprocess.run(
        [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{sig})"]).returncode)


def test_amx_that_dies_is_dropped_and_repacked_kernels_kept(home, monkeypatch):
    monkeypatch.setattr(probe, "extra_bufts", lambda: ["AMX", "CPU_REPACK"])
    calls = []

    def child(mode, folder):
        calls.append(mode)
        return _dies_by("SIGILL") if mode == "full" else "ok"

    res = probe.probe_llamacpp(child=child, quiet=True)
    assert calls == ["full", "no-amx"]
    assert res.mode == "no-amx"
    assert res.tried["full"] == "killed by SIGILL (illegal instruction)"
    assert res.amx.startswith("off (killed by SIGILL")
    again = probe.probe_llamacpp(child=lambda m, f: pytest.fail("the verdict is cached"), quiet=True)
    assert again.cached and again.mode == "no-amx"
    assert probe.llamacpp_mode() == "no-amx"


def test_without_amx_the_no_amx_mode_is_not_tried(home, monkeypatch):
    monkeypatch.setattr(probe, "extra_bufts", lambda: ["CPU_REPACK"])
    calls = []
    res = probe.probe_llamacpp(child=lambda m, f: calls.append(m) or ("ok" if m == "plain" else _dies_by("SIGSEGV")),
                               quiet=True)
    assert calls == ["full", "plain"] and res.mode == "plain" and res.amx == "not built in"


def test_no_mode_that_runs_is_a_clear_error_naming_the_fix(home, monkeypatch):
    monkeypatch.setattr(probe, "extra_bufts", lambda: [])
    monkeypatch.setattr(probe, "run_child", lambda m, f: _dies_by("SIGILL"))
    with pytest.raises(probe.RuntimeBroken, match="reinstall it for this machine.*--no-cache-dir llama-cpp-python"):
        probe.llamacpp_mode()


def test_damaged_cache_is_redone(home, monkeypatch):
    monkeypatch.setattr(probe, "extra_bufts", lambda: [])
    probe.probe_llamacpp(child=lambda m, f: "ok", quiet=True)
    (cache,) = (home / "probe").glob("llamacpp-*.json")
    cache.write_text("{not json")
    assert probe.probe_llamacpp(child=lambda m, f: "ok", quiet=True).cached is False
    assert json.loads(cache.read_text())["mode"] == "full"


def test_forced_mode_is_checked(home, monkeypatch):
    monkeypatch.setenv("EDGEMED_LLAMACPP_MODE", "turbo")
    with pytest.raises(probe.RuntimeBroken, match="choose one of full, no-amx, plain"):
        probe.llamacpp_mode()


def test_real_probe_on_this_machine_finds_a_working_mode():
    res = probe.probe_llamacpp(quiet=True)
    assert res.mode in probe.MODES and res.tried[res.mode] == "ok"
    # as built, even where this process already took AMX out (an AMX machine whose probe said no-amx)
    assert res.extra_bufts == probe.built_extra_bufts()
    assert set(probe.extra_bufts()) <= set(res.extra_bufts)


def test_dropping_a_buffer_type_removes_it_from_what_llama_cpp_loads_with(tmp_path):
    """In a fresh process (the change is process-wide): CPU_REPACK out, the q4_0 probe model still decodes."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from edgemed import probe\n"
        "before = probe.extra_bufts()\n"
        "after = probe.drop_extra_bufts({'CPU_REPACK'})\n"
        "assert probe.built_extra_bufts() == before, (probe.built_extra_bufts(), before)\n"
        "probe._write_text_probe(Path(sys.argv[1]) / 'p.gguf')\n"
        "import llama_cpp\n"
        "from llama_cpp import _internals\n"
        "q = probe._quantize(Path(sys.argv[1]) / 'p.gguf', Path(sys.argv[1]) / 'q.gguf', 'q4_0')\n"
        "mp = llama_cpp.llama_model_default_params()\n"
        "m = _internals.LlamaModel(path_model=str(q), params=mp, verbose=False)\n"
        "print(json.dumps([before, after, m.n_vocab()]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after, n_vocab = json.loads(r.stdout.strip().splitlines()[-1])
    assert "CPU_REPACK" in before and "CPU_REPACK" not in after and len(after) == len(before) - 1
    assert n_vocab == 512

"""The parity reference cache: a second run takes the reference's turns from disk without loading its weights, any
change to the probes or the weights misses, a damaged entry is rebuilt, two builders never build one entry at once,
and the figures and verdicts are the same with the cache, without it, cold and warm."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import write_vqa
from test_parity import copy_model, perturb_one

from edgemed.parity import reference as refmod
from edgemed.parity import run_parity


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Each test its own empty cache folder."""
    folder = tmp_path / "parity-ref"
    monkeypatch.setenv("EDGEMED_PARITY_CACHE_DIR", str(folder))
    monkeypatch.delenv("EDGEMED_PARITY_CACHE", raising=False)
    return folder


@pytest.fixture
def reference_calls(monkeypatch):
    """Counts what the reference folder's model is asked (forwards, generations, weight loads), by folder."""
    from edgemed.backends import pytorch

    calls: dict[str, list[str]] = {}

    def counted(name, fn):
        def wrapper(self, *a, **kw):
            calls.setdefault(str(self.folder), []).append(name)
            return fn(self, *a, **kw)
        return wrapper

    for name in ("logits_batch", "generate_batch", "_logits", "_token_ids"):
        monkeypatch.setattr(pytorch.TorchBackend, name, counted(name, getattr(pytorch.TorchBackend, name)))
    real_load = pytorch.load_any

    def load(path, **kw):
        calls.setdefault(str(path), []).append("load_weights")
        return real_load(path, **kw)

    monkeypatch.setattr(pytorch, "load_any", load)
    return calls


def _probes(tmp_path: Path, n: int = 3) -> Path:
    return write_vqa(tmp_path / "probes", n=n, image=False)


def _same(a, b) -> None:
    """Two results agree on every figure, check and verdict (not on timing or how the reference was had)."""
    skip = ("seconds", "reference_cache", "machine", "runtimes")
    da = {k: v for k, v in a.to_dict().items() if k not in skip}
    db = {k: v for k, v in b.to_dict().items() if k not in skip}
    assert json.dumps(da, default=str, sort_keys=True) == json.dumps(db, default=str, sort_keys=True)


def test_second_run_hits_without_loading_the_reference_weights(tiny_model, tmp_path, reference_calls, cache_dir):
    ref = tiny_model("llama")
    cand = copy_model(ref, tmp_path / "cand")
    probes = _probes(tmp_path)
    cold = run_parity(cand, reference=ref, probes=probes)
    assert cold.reference_cache["hit"] is False and cold.reference_cache["forwards"]["logits"] >= 1
    assert "load_weights" in reference_calls[str(ref)] and "logits_batch" in reference_calls[str(ref)]
    assert Path(cold.reference_cache["path"]).parent == cache_dir
    reference_calls.clear()
    warm = run_parity(cand, reference=ref, probes=probes)
    assert warm.reference_cache["hit"] is True and warm.reference_cache["key"] == cold.reference_cache["key"]
    assert str(ref) not in reference_calls, reference_calls[str(ref)]  # no weights, no forward, no generation
    assert reference_calls[str(cand)]  # the candidate itself still runs
    assert "reference: from the cache" in warm.table()
    _same(cold, warm)


def test_a_changed_probe_or_weight_byte_misses(tiny_model, tmp_path):
    src = tiny_model("llama")
    ref = copy_model(src, tmp_path / "ref")
    cand = copy_model(src, tmp_path / "cand")
    probes = _probes(tmp_path)
    first = run_parity(cand, reference=ref, probes=probes).reference_cache
    lines = probes.read_text().splitlines()
    rec = json.loads(lines[1])
    lines[1] = json.dumps(rec | {"question": rec["question"] + " Now."})
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(lines) + "\n")
    changed_probe = run_parity(cand, reference=ref, probes=other).reference_cache
    assert not changed_probe["hit"] and changed_probe["key"] != first["key"]

    weights = ref / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    weights.write_bytes(bytes(data))
    changed_weight = run_parity(cand, reference=ref, probes=probes, localise=False)
    assert not changed_weight.reference_cache["hit"] and changed_weight.reference_cache["key"] != first["key"]
    again = run_parity(cand, reference=ref, probes=probes, localise=False).reference_cache
    assert again["hit"] and again["key"] == changed_weight.reference_cache["key"]


def test_figures_and_verdicts_same_with_and_without_the_cache(tiny_model, tmp_path, monkeypatch):
    ref = tiny_model("llama")
    probes = _probes(tmp_path)
    clean = copy_model(ref, tmp_path / "clean")
    bad = copy_model(ref, tmp_path / "bad")
    perturb_one(bad)
    for cand in (clean, bad):
        monkeypatch.setenv("EDGEMED_PARITY_CACHE", "off")
        off = run_parity(cand, reference=ref, probes=probes)
        assert off.reference_cache["hit"] is False and off.reference_cache["path"] is None
        monkeypatch.delenv("EDGEMED_PARITY_CACHE")
        cold = run_parity(cand, reference=ref, probes=probes)
        warm = run_parity(cand, reference=ref, probes=probes)
        assert not cold.reference_cache["hit"] or cand is bad  # the clean run built the entry the bad one reads
        assert warm.reference_cache["hit"]
        _same(off, cold)
        _same(off, warm)
    assert not warm.passed and "weights" in warm.rows[0].causes()


@pytest.mark.parametrize("damage", ["meta", "logits", "missing"])
def test_a_damaged_entry_is_computed_again(tiny_model, tmp_path, damage):
    ref = tiny_model("llama")
    cand = copy_model(ref, tmp_path / "cand")
    probes = _probes(tmp_path)
    first = run_parity(cand, reference=ref, probes=probes)
    entry = Path(first.reference_cache["path"])
    if damage == "meta":
        (entry / "meta.json").write_text("{not json")
    elif damage == "logits":
        f = entry / "logits.npy"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # cut short
    else:
        (entry / "logits.npy").unlink()
    again = run_parity(cand, reference=ref, probes=probes)
    assert again.reference_cache["hit"] is False and again.reference_cache["key"] == first.reference_cache["key"]
    _same(first, again)
    assert run_parity(cand, reference=ref, probes=probes).reference_cache["hit"]  # rebuilt whole


def test_two_builders_build_one_entry_once(tiny_model, tmp_path):
    from edgemed.backends.pytorch import TorchBackend
    from edgemed.parity import read_probes

    ref = tiny_model("llama")
    probes = read_probes(_probes(tmp_path))
    backends = [TorchBackend(ref, device="cpu", lazy=True) for _ in range(2)]
    out: list = [None, None]

    def work(k: int) -> None:
        out[k] = refmod.reference_turns(backends[k], ref, probes)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    infos = sorted((o[1] for o in out), key=lambda i: i.hit)
    assert [i.hit for i in infos] == [False, True], infos  # the second waited on the lock, then read the entry
    assert sum(b.weights_loaded for b in backends) == 1
    for a, b in zip(out[0][0], out[1][0], strict=True):
        assert a.seq == b.seq and a.answer == b.answer and np.array_equal(a.logits, b.logits)
    for b in backends:
        b.close()


def test_entry_holds_float32_rows_and_least_recent_entries_are_pruned(tiny_model, tmp_path, cache_dir, monkeypatch):
    ref = tiny_model("llama")
    cand = copy_model(ref, tmp_path / "cand")
    probes = _probes(tmp_path)
    res = run_parity(cand, reference=ref, probes=probes)
    entry = Path(res.reference_cache["path"])
    logits = np.load(entry / "logits.npy", mmap_mode="r")
    meta = json.loads((entry / "meta.json").read_text())
    assert logits.dtype == np.float32 and logits.shape[0] == res.positions == meta["probes"][-1]["rows"][1]
    shutil.copytree(entry, cache_dir / "old-entry")  # a second entry, used longer ago
    os.utime(cache_dir / "old-entry" / "meta.json", (1, 1))
    monkeypatch.setenv("EDGEMED_PARITY_CACHE_GB", str(1.5 * logits.nbytes / (1 << 30)))
    removed = refmod.prune(cache_dir, keep=entry)
    assert removed == [cache_dir / "old-entry"] and entry.is_dir()

"""The demo report's retention lines: each export against the fine-tuned PyTorch model, with CI, flips, McNemar."""

from __future__ import annotations

from pathlib import Path

from edgemed.demo import Row, _retention_lines, _retention_note


def _items(hits):
    return [{"score": float(h), "hit": bool(h)} for h in hits]


def test_retention_lines_name_flips_and_interval():
    tuned = Row("fine-tuned (merged, PyTorch fp32)", "pytorch", Path("m"), items=_items([1, 1, 0, 1]))
    before = Row("base (before fine-tuning)", "pytorch", Path("b"), items=_items([0, 0, 0, 0]))
    q8 = Row("GGUF q8_0 (llama.cpp)", "llamacpp", Path("g"), quant="q8_0", items=_items([1, 0, 1, 1]))
    lines = _retention_lines([before, tuned, q8])
    (line,) = [x for x in lines if x.startswith("- ")]
    assert line.startswith("- GGUF q8_0 (llama.cpp): +0.0 points (95% CI")
    assert "2 of 4 answers flipped (1 lost, 1 gained" in line and "McNemar exact p = 1" in line
    assert _retention_lines([before]) == []
    assert _retention_note(q8, [before, tuned, q8]).startswith("; vs the fine-tuned PyTorch model: +0.0 points")
    assert _retention_note(q8, [before, q8]) == ""

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


def test_report_task_trains_on_reports_and_scores_every_export(tiny_model, tmp_path, monkeypatch):
    """The demo's report step on a tiny LLaVA: a report fine-tune of the given model on the demo set's reports.json,
    merged and exported to GGUF, each row scored with BLEU/ROUGE-L/CIDEr and each export compared with its model."""
    import json

    from edgemed import report_scores

    monkeypatch.setattr(report_scores, "java_available", lambda: False)  # METEOR: a JVM per row, not checked here

    from edgemed.data import generate_demo_set
    from edgemed.demo import REPORT_QUANTS, report_lines, report_task

    data = generate_demo_set(tmp_path / "data", n_train=4, n_val=2, n_test=3)
    ann = json.loads(data["reports"].read_text())
    assert {k: len(v) for k, v in ann.items()} == {"train": 4, "val": 2, "test": 3}
    res = report_task(tiny_model("llava"), data["reports"], tmp_path / "out", steps=2, max_tokens=8)
    log = [json.loads(x) for x in (tmp_path / "out" / "report-run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log] == [1, 2]
    labels = [r["label"] for r in res.results]
    assert labels == ["llava-0", "report-model", *(f"report-gguf {q}" for q in REPORT_QUANTS)]
    assert all(r["overall"]["n"] == 3 and {"bleu_1", "bleu_4", "rouge_l", "cider"} <= set(r["overall"])
               for r in res.results)
    assert [r.get("vs") for r in res.results] == [None, "llava-0", "report-model", "report-model"]
    lines = report_lines(res)
    assert len([x for x in lines if x.startswith("| report-gguf")]) == len(REPORT_QUANTS)
    assert json.loads((tmp_path / "out" / "eval-report.json").read_text())["task"] == "report"

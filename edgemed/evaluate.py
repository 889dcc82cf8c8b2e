"""Medical VQA evaluation, scored as VQA-RAD and SLAKE results are reported, on any runtime.

Closed questions (yes/no, and fixed choices such as left/right) score accuracy; open questions score exact match
and token recall (the share of the reference answer's words found in the prediction, as LLaVA-Med reports open
answers). Every runtime renders the same prompt (``backend.render`` with the model's own chat template), answers
greedily with a short budget and stops at end of turn, so PyTorch, GGUF and ONNX rows differ only by the model.

``evaluate_many`` runs several models or exports on one file and prints a retention table: each export against
the PyTorch model it was exported from (when that model is in the list), otherwise against the first row.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemed.artifacts import MANIFEST, atomic_file, read_manifest
from edgemed.errors import ParityError

MAX_TOKENS = 12  # answers are a word or a phrase; 12 tokens hold any reference answer of the demo, VQA-RAD, SLAKE
ARTICLES = ("a", "an", "the")
# Closed answers are mapped to yes/no from the prediction's first word. "none" is read as "no" because closed
# questions in VQA-RAD and SLAKE ask whether something is present ("Is there ...?"), where "None." denies it;
# "present"/"absent" and "positive"/"negative" are how radiology reports say yes/no; "normal" is not mapped
# (it answers a different question than presence).
YES = frozenset({"yes", "yeah", "yep", "true", "present", "positive", "correct", "affirmative"})
NO = frozenset({"no", "nope", "none", "false", "absent", "negative", "incorrect", "not"})
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, articles removed, whitespace collapsed."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def yes_no(text: str) -> str | None:
    """"yes" or "no" for an answer whose first word says so (synonyms mapped), else None."""
    words = normalize(text).split()
    if not words:
        return None
    if words[0] in YES:
        return "yes"
    if words[0] in NO:
        return "no"
    return None


def score(prediction: str, reference: str, answer_type: str) -> dict[str, float]:
    """Scores of one answer: closed -> ``correct``; open -> ``exact`` and ``recall``; both get ``score``.

    ``score`` is what the overall figure averages: accuracy for closed, exact match for open.
    """
    ref, pred = normalize(reference), normalize(prediction)
    if answer_type == "closed":
        want = yes_no(reference)
        if want is not None:
            ok = yes_no(prediction) == want
        else:  # a fixed-choice closed answer (left/right, CT/MRI): the prediction must name it
            ok = pred == ref or pred.split()[:len(ref.split())] == ref.split()
        return {"correct": float(ok), "score": float(ok)}
    ref_words, pred_words = ref.split(), set(pred.split())
    recall = sum(w in pred_words for w in ref_words) / len(ref_words) if ref_words else float(not pred_words)
    exact = float(pred == ref)
    return {"exact": exact, "recall": recall, "score": exact}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _summary(items: list[dict[str, Any]]) -> dict[str, Any]:
    closed = [i for i in items if i["answer_type"] == "closed"]
    open_ = [i for i in items if i["answer_type"] == "open"]
    return {"n": len(items), "score": _mean([i["score"] for i in items]) or 0.0,
            "closed": {"n": len(closed), "accuracy": _mean([i["correct"] for i in closed])},
            "open": {"n": len(open_), "exact": _mean([i["exact"] for i in open_]),
                     "recall": _mean([i["recall"] for i in open_])}}


def evaluate(backend_or_path: Any, records: list, *, max_tokens: int = MAX_TOKENS, progress: bool = False,
             **open_kw: Any) -> dict[str, Any]:
    """Answer every record greedily and score it.

    Args:
        backend_or_path: an open Backend, or a model/run/export folder (opened with ``open_backend(**open_kw)``).
        records: ``edgemed.data.VQARecord`` list.
        max_tokens: answer budget.
        progress: print a dot per 10 records.

    Returns:
        ``{"overall": summary, "by_type": {...}, "by_task": {task: summary}, "predictions": [...],
        "seconds": float}``; a summary has ``n``, ``score``, ``closed.accuracy``, ``open.exact``, ``open.recall``.
    """
    from edgemed.backends.base import GenParams
    from edgemed.data import load_image
    from edgemed.parity import open_model

    own = isinstance(backend_or_path, str | Path)
    backend = open_model(Path(backend_or_path), **open_kw) if own else backend_or_path
    t0 = time.time()
    items: list[dict[str, Any]] = []
    try:
        for n, r in enumerate(records):
            image = load_image(r.image) if (r.image is not None and backend.is_vision) else None
            prompt = backend.render(r.question, image=image is not None, system=r.system)
            answer = "".join(backend.generate(prompt, image=image, params=GenParams(max_tokens=max_tokens,
                                                                                    temperature=0.0)))
            s = score(answer, r.answer, r.answer_type)
            items.append({"source": r.source, "question": r.question, "reference": r.answer, "prediction": answer,
                          "answer_type": r.answer_type, "task": r.task, "correct": s.get("correct"),
                          "exact": s.get("exact"), "recall": s.get("recall"), "score": s["score"]})
            if progress and n % 10 == 9:
                print(".", end="", flush=True)
    finally:
        if own:
            backend.close()
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in items:
        by_task[i["task"] or "-"].append(i)
    return {"overall": _summary(items), "by_task": {k: _summary(v) for k, v in sorted(by_task.items())},
            "predictions": items, "seconds": time.time() - t0}


# ---------------------------------------------------------------- several models
def describe(path: Path) -> dict[str, Any]:
    """Kind, quant and parent of a model or export folder, for the table."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return {"kind": "model", "quant": "", "parent": None}
    m = read_manifest(path)
    quants = m.get("quants") or ([m["quant"]] if m.get("quant") else [])
    parent = (m.get("parent") or {}).get("path")
    return {"kind": m.get("kind"), "quant": ",".join(quants), "parent": str(Path(parent).absolute()) if parent
            else None}


@dataclass
class EvalResult:
    """One entry per evaluated model or export file, and which entry each is measured against."""

    data: str
    results: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """Closed accuracy, open exact match and recall, overall, and the change against the reference row."""
        head = (f"{'model':<34}{'kind':<9}{'n':>5}{'closed acc':>11}{'open EM':>9}{'open rec':>9}{'overall':>9}"
                f"{'delta':>8}  vs")
        lines = [f"eval on {self.data}", head]

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.1f}"

        for r in self.results:
            o = r["overall"]
            delta = "" if r.get("delta_points") is None else f"{r['delta_points']:+.1f}"
            lines.append(f"{r['label'][:33]:<34}{r['kind']:<9}{o['n']:>5}{pct(o['closed']['accuracy']):>11}"
                         f"{pct(o['open']['exact']):>9}{pct(o['open']['recall']):>9}{pct(o['score']):>9}{delta:>8}"
                         f"  {r.get('vs') or ''}")
        tasks = sorted({t for r in self.results for t in r["by_task"]})
        if len(tasks) > 1:
            lines.append("per task (score): " + "  ".join(tasks))
            for r in self.results:
                lines.append(f"  {r['label'][:32]:<33}" + "  ".join(
                    f"{pct(r['by_task'].get(t, {}).get('score')):>{max(5, len(t))}}" for t in tasks))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "results": self.results}


def evaluate_many(paths: list[Path | str], data_path: Path | str, report: Path | str | None = None,
                  limit: int | None = None, max_tokens: int = MAX_TOKENS, n_threads: int | None = None,
                  chat_template: str | None = None) -> EvalResult:
    """Evaluate several models or exports on one VQA file; each file of a multi-quant GGUF folder is a row.

    Args:
        paths: model, run, gguf or onnx folders (base model, fine-tuned, exports...).
        data_path: VQA JSONL, or VQA-RAD / SLAKE JSON.
        report: write the JSON report (with every prediction) here; replaced if it exists.
        limit: only the first N records.
        max_tokens: answer budget.
        n_threads: CPU threads per runtime (default: the runtime's choice; 1 is faster on a busy machine).
        chat_template: template text every model renders with (``--chat-template``); a model without a template
            and without this is asked with plain text prompts.

    Returns:
        The result; ``.table()`` prints the retention table.
    """
    from edgemed.data import VQARecord, read_dataset

    records = read_dataset(data_path)
    if not records or not isinstance(records[0], VQARecord):
        raise ParityError(f"{data_path}: is a text corpus; evaluation needs VQA records (question, answer)")
    if limit is not None:
        if limit < 1:
            raise ParityError(f"--limit must be at least 1, got {limit}")
        records = records[:limit]
    out = EvalResult(str(data_path))
    for p in paths:
        p = Path(p)
        info = describe(p)
        quants = info["quant"].split(",") if info["kind"] == "gguf" and info["quant"] else [None]
        for q in quants:
            kw = ({"quant": q} if q else {}) | ({"n_threads": n_threads} if n_threads else {})
            kw |= {"chat_template": chat_template} if chat_template is not None else {}
            res = evaluate(p, records, max_tokens=max_tokens, **kw)
            label = p.name + (f" {q}" if q and len(quants) > 1 else (f" {q}" if q else ""))
            out.results.append({"label": label, "path": str(p.absolute()), "quant": q or info["quant"],
                                "kind": info["kind"], "parent": info["parent"], **res})
    _deltas(out.results)
    if report:
        # a report is refreshed on every run, so replacing it is expected (written whole, then renamed)
        with atomic_file(report, overwrite=True) as tmp:
            tmp.write_text(json.dumps(out.to_dict(), indent=2, default=str) + "\n")
    return out


def _deltas(results: list[dict[str, Any]]) -> None:
    """Each export against its parent model when that is in the list, else against the first row."""
    by_path = {r["path"]: r for r in results if r["kind"] in ("model", "run")}
    first = results[0] if results else None
    for r in results:
        base = by_path.get(r["parent"] or "") if r["kind"] in ("gguf", "onnx") else None
        base = base or (first if r is not first else None)
        if base is not None:
            r["vs"] = base["label"]
            r["delta_points"] = 100 * (r["overall"]["score"] - base["overall"]["score"])

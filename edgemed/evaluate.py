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
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemed.artifacts import MANIFEST, atomic_file, read_manifest
from edgemed.errors import DataError, ParityError
from edgemed.report_scores import report_metrics
from edgemed.scoring import (  # noqa: F401 - normalize, yes_no, score: edgemed's rules, importable from here
    DEFAULT_PROTOCOL,
    compare,
    get_protocol,
    normalize,
    score,
    summarize,
    yes_no,
)

MAX_TOKENS = 12  # answers are a word or a phrase; 12 tokens hold any reference answer of the demo, VQA-RAD, SLAKE
REPORT_MAX_TOKENS = 160  # IU-Xray findings average about 35 words (R2Gen's max_seq_length is 60 words)
TASKS = ("vqa", "report")


def score_items(records: list, answers: list[str], protocol: str = DEFAULT_PROTOCOL, task: str = "vqa"
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score answers to records under a protocol (VQA) or with the report metrics (reports).

    Returns:
        (items, summary): one dict per record (``score``, ``hit``, ``metrics``, the texts) and the summary
        (``scoring.summarize`` for VQA; BLEU/ROUGE-L/CIDEr/METEOR for reports, ``score`` = ROUGE-L).
    """
    if task not in TASKS:
        raise ParityError(f"unknown task {task!r} for --task; choose one of {', '.join(TASKS)}")
    p = get_protocol(protocol)
    items: list[dict[str, Any]] = []
    for r, answer in zip(records, answers, strict=True):
        item = {"id": r.id, "source": r.source, "question": r.question, "reference": r.answer,
                "prediction": answer, "answer_type": r.answer_type, "task": r.task}
        if task == "vqa":
            s = p.score_one(answer, r.answer, r.answer_type)
            item |= {"score": s.score, "hit": s.hit, "metrics": s.metrics, "correct": s.metrics.get("correct"),
                     "exact": s.metrics.get("exact"), "recall": s.metrics.get("recall")}
        items.append(item)
    if task == "vqa":
        return items, summarize(items, protocol)
    keys = [str(i) for i in range(len(records))]  # positions: ids need not be unique across splits
    m = report_metrics({k: r.answer for k, r in zip(keys, records, strict=True)},
                       {k: a for k, a in zip(keys, answers, strict=True)})
    order = {k: n for n, k in enumerate(m.pop("ids"))}
    per = m.pop("per_item")
    for k, item in zip(keys, items, strict=True):
        item["metrics"] = {name: vals[order[k]] for name, vals in per.items()}
        item["score"], item["hit"] = item["metrics"]["rouge_l"], None
    return items, {"task": "report", **m, "score": m["rouge_l"]}


def evaluate(backend_or_path: Any, records: list, *, max_tokens: int | None = None, progress: bool = False,
             protocol: str = DEFAULT_PROTOCOL, task: str = "vqa", **open_kw: Any) -> dict[str, Any]:
    """Answer every record greedily and score it.

    Args:
        backend_or_path: an open Backend, or a model/run/export folder (opened with ``open_model(**open_kw)``).
        records: ``edgemed.data.VQARecord`` list.
        max_tokens: answer budget (default: MAX_TOKENS for VQA, REPORT_MAX_TOKENS for reports).
        progress: print a dot per 10 records.
        protocol: VQA scoring protocol (``edgemed.scoring.PROTOCOLS``).
        task: "vqa" or "report".

    Returns:
        ``{"overall": summary, "by_task": {task: summary}, "predictions": [...], "seconds": float}``; a VQA
        summary has ``n``, ``score``, ``closed.accuracy``, ``open.score`` and the protocol's metric means.
    """
    from edgemed.backends import open_model
    from edgemed.backends.base import GenParams
    from edgemed.data import load_image

    get_protocol(protocol)
    budget = max_tokens or (REPORT_MAX_TOKENS if task == "report" else MAX_TOKENS)
    own = isinstance(backend_or_path, str | Path)
    backend = open_model(Path(backend_or_path), **open_kw) if own else backend_or_path
    t0 = time.time()
    answers: list[str] = []
    render = backend.arch.dicom_render  # CT DICOM as the family was trained
    try:
        for n, r in enumerate(records):
            image = load_image(r.image, render=render) if (r.image is not None and backend.is_vision) else None
            prompt = backend.render(r.question, image=image is not None, system=r.system)
            answers.append("".join(backend.generate(prompt, image=image,
                                                    params=GenParams(max_tokens=budget, temperature=0.0))))
            if progress and n % 10 == 9:
                print(".", end="", flush=True)
    finally:
        if own:
            backend.close()
    items, overall = score_items(records, answers, protocol, task)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in items:
        by_task[i["task"] or "-"].append(i)
    per_task = {k: summarize(v, protocol) for k, v in sorted(by_task.items())} if task == "vqa" else {}
    return {"overall": overall, "by_task": per_task, "predictions": items, "seconds": time.time() - t0}


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
    protocol: str = DEFAULT_PROTOCOL
    task: str = "vqa"

    def table(self) -> str:
        """The scores, the change against the reference row with its 95% CI, the flips and McNemar's p."""
        return _report_table(self) if self.task == "report" else _vqa_table(self)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "protocol": self.protocol, "task": self.task, "results": self.results}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ci(r: dict[str, Any]) -> str:
    ret = r.get("retention")
    return "" if not ret else f"[{100 * ret['ci_low']:+.1f},{100 * ret['ci_high']:+.1f}]"


def _vqa_table(res: EvalResult) -> str:
    head = (f"{'model':<34}{'kind':<9}{'n':>5}{'closed':>8}{'open':>7}{'overall':>9}{'delta':>7}{'95% CI':>14}"
            f"{'flips':>9}{'McNemar p':>11}  vs")
    lines = [f"eval on {res.data} (protocol {res.protocol})", head]
    for r in res.results:
        o, ret = r["overall"], r.get("retention")
        delta = "" if r.get("delta_points") is None else f"{r['delta_points']:+.1f}"
        flips = "" if not ret else f"-{ret['lost']}/+{ret['gained']}"
        p = "" if not ret else f"{ret['mcnemar_p']:.3g}"
        lines.append(f"{r['label'][:33]:<34}{r['kind']:<9}{o['n']:>5}{_pct(o['closed']['accuracy']):>8}"
                     f"{_pct(o['open']['score']):>7}{_pct(o['score']):>9}{delta:>7}{_ci(r):>14}{flips:>9}{p:>11}"
                     f"  {r.get('vs') or ''}")
    tasks = sorted({t for r in res.results for t in r["by_task"]})
    if len(tasks) > 1:
        lines.append("per task (score): " + "  ".join(tasks))
        for r in res.results:
            lines.append(f"  {r['label'][:32]:<33}" + "  ".join(
                f"{_pct(r['by_task'].get(t, {}).get('score')):>{max(5, len(t))}}" for t in tasks))
    rets = [r for r in res.results if r.get("retention")]
    if rets:
        lines.append("delta and CI in points (paired bootstrap, 10,000 resamples); flips: answers right in the "
                     "reference and wrong here (-), or the reverse (+)")
    return "\n".join(lines)


def _report_table(res: EvalResult) -> str:
    head = (f"{'model':<34}{'kind':<9}{'n':>5}{'BLEU-1':>8}{'BLEU-4':>8}{'ROUGE-L':>9}{'CIDEr':>7}{'METEOR':>8}"
            f"{'dR-L':>7}{'95% CI':>14}  vs")
    lines = [f"report generation on {res.data}", head]
    for r in res.results:
        o = r["overall"]
        delta = "" if r.get("delta_points") is None else f"{r['delta_points']:+.1f}"
        meteor = "skip" if o.get("meteor") is None else f"{100 * o['meteor']:.1f}"
        lines.append(f"{r['label'][:33]:<34}{r['kind']:<9}{o['n']:>5}{_pct(o['bleu_1']):>8}{_pct(o['bleu_4']):>8}"
                     f"{_pct(o['rouge_l']):>9}{o['cider']:>7.3f}{meteor:>8}{delta:>7}{_ci(r):>14}  {r.get('vs') or ''}")
    skipped = {r["overall"].get("meteor_skipped") for r in res.results} - {None}
    if skipped:
        lines.append(f"METEOR skipped: {'; '.join(sorted(skipped))}")
    return "\n".join(lines)


def _load_records(data_path: Path | str, fmt: str | None, task: str, split: str | None, trust_pickle: bool,
                  image_root: Path | str | None, check_images: bool = True) -> list:
    """Records for evaluation: edgemed's readers for JSONL/VQA-RAD/SLAKE without a format (as before), the
    public-layout readers (edgemed.datasets) with one."""
    from edgemed.data import VQARecord, read_dataset
    from edgemed.datasets import read_data

    path = Path(data_path)
    if fmt is None and path.suffix.lower() == ".jsonl":
        records = read_dataset(path)
        if not records or not isinstance(records[0], VQARecord):
            raise ParityError(f"{data_path}: is a text corpus; evaluation needs VQA records (question, answer)")
        fmt = "jsonl"
    records = read_data(path, fmt, image_root=image_root, split=split, trust_pickle=trust_pickle,
                        check_images=check_images)
    if task == "report":
        records = [r for r in records if r.task == "report"] or records
    return records


def evaluate_many(paths: list[Path | str], data_path: Path | str, report: Path | str | None = None,
                  limit: int | None = None, max_tokens: int | None = None, n_threads: int | None = None,
                  protocol: str = DEFAULT_PROTOCOL, task: str = "vqa", fmt: str | None = None,
                  split: str | None = None, trust_pickle: bool = False,
                  image_root: Path | str | None = None, chat_template: str | None = None) -> EvalResult:
    """Evaluate several models or exports on one data file; each file of a multi-quant GGUF folder is a row.

    Args:
        paths: model, run, gguf or onnx folders (base model, fine-tuned, exports...).
        data_path: VQA JSONL, or a public layout (edgemed.datasets: VQA-RAD, SLAKE, PathVQA, R2Gen).
        report: write the JSON report (with every prediction) here; replaced if it exists.
        limit: only the first N records.
        max_tokens: answer budget (default by task).
        n_threads: CPU threads per runtime (default: the runtime's choice; 1 is faster on a busy machine).
        protocol: VQA scoring protocol.
        task: "vqa" or "report".
        fmt: data layout (edgemed.datasets.FORMATS); None recognises it.
        split: the split inside the file (VQA-RAD: train/test/all; R2Gen: train/val/test).
        trust_pickle: allow PathVQA's release pickles.
        image_root: image folder where the layout's default does not fit.
        chat_template: template text every model renders with (``--chat-template``); a model without a template
            and without this is asked with plain text prompts.

    Returns:
        The result; ``.table()`` prints the retention table.
    """
    get_protocol(protocol)
    if task not in TASKS:
        raise ParityError(f"unknown task {task!r} for --task; choose one of {', '.join(TASKS)}")
    records = _load_records(data_path, fmt, task, split, trust_pickle, image_root)
    if limit is not None:
        if limit < 1:
            raise ParityError(f"--limit must be at least 1, got {limit}")
        records = records[:limit]
    out = EvalResult(str(data_path), protocol=protocol, task=task)
    for p in paths:
        p = Path(p)
        info = describe(p)
        quants = info["quant"].split(",") if info["kind"] == "gguf" and info["quant"] else [None]
        for q in quants:
            kw = ({"quant": q} if q else {}) | ({"n_threads": n_threads} if n_threads else {})
            kw |= {"chat_template": chat_template} if chat_template is not None else {}
            res = evaluate(p, records, max_tokens=max_tokens, protocol=protocol, task=task, **kw)
            label = p.name + (f" {q}" if q and len(quants) > 1 else (f" {q}" if q else ""))
            out.results.append({"label": label, "path": str(p.absolute()), "quant": q or info["quant"],
                                "kind": info["kind"], "parent": info["parent"], **res})
    _deltas(out.results, flips=task == "vqa")
    if report:
        # a report is refreshed on every run, so replacing it is expected (written whole, then renamed)
        with atomic_file(report, overwrite=True) as tmp:
            tmp.write_text(json.dumps(out.to_dict(), indent=2, default=str) + "\n")
    return out


def _deltas(results: list[dict[str, Any]], flips: bool = True) -> None:
    """Each export against its parent model when that is in the list, else against the first row: the change,
    its paired bootstrap CI, and (VQA) the flips and McNemar's exact test."""
    by_path = {r["path"]: r for r in results if r["kind"] in ("model", "run")}
    first = results[0] if results else None
    for r in results:
        base = by_path.get(r["parent"] or "") if r["kind"] in ("gguf", "onnx") else None
        base = base or (first if r is not first else None)
        if base is not None:
            r["vs"] = base["label"]
            r["delta_points"] = 100 * (r["overall"]["score"] - base["overall"]["score"])
            ret = compare(base["predictions"], r["predictions"], flips=flips)
            r["retention"] = ret.to_dict() | {"text": ret.text()}


# ---------------------------------------------------------------- scoring saved answers
def read_predictions(path: Path | str) -> dict[str, str]:
    """PRED.jsonl: one ``{"id": ..., "answer": "..."}`` per line; every bad line reported at once."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such predictions file; give a JSONL with one {{\"id\", \"answer\"}} per line")
    out: dict[str, str] = {}
    problems: list[str] = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{where}: not a JSON object on one line ({e})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: not a JSON object; each line is {{\"id\": ..., \"answer\": \"...\"}}")
            continue
        rid, ans = obj.get("id"), obj.get("answer")
        if isinstance(rid, bool) or not isinstance(rid, str | int):
            problems.append(f"{where}: key 'id' must be the record's id in the data file (string or number)")
        elif not isinstance(ans, str):
            problems.append(f"{where}: key 'answer' must be a string")
        elif str(rid) in out:
            problems.append(f"{where}: id {rid!r} appears twice; keep one answer per record")
        else:
            out[str(rid)] = ans
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else "\n".join(
            [f"{path}: {len(problems)} bad lines", *(f"  {p}" for p in problems[:10])]))
    if not out:
        raise DataError(f"{path}: no predictions; each line is {{\"id\": ..., \"answer\": \"...\"}}")
    return out


def rescore(predictions: Path | str, data_path: Path | str, report: Path | str | None = None,
            protocol: str = DEFAULT_PROTOCOL, task: str = "vqa", fmt: str | None = None, split: str | None = None,
            trust_pickle: bool = False, image_root: Path | str | None = None) -> dict[str, Any]:
    """Score answers produced elsewhere (PRED.jsonl) against a data file, under a protocol.

    Every record of the data file (after its split and language filters) needs an answer, and every answer a
    record; ids are the data file's own (qid, study id).

    Returns:
        The report: top-level ``overall``, ``closed``, ``open`` (fractions) for VQA, or ``bleu_1``..``bleu_4``,
        ``rouge_l``, ``cider``, ``meteor`` for reports, plus ``protocol``, ``n``, ``summary`` and ``items``.
    """
    get_protocol(protocol)
    answers = read_predictions(predictions)
    records = _load_records(data_path, fmt, task, split, trust_pickle, image_root, check_images=False)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"{data_path}: record ids repeat ({dup}); choose one split with --split")
    missing = [i for i in ids if i not in answers]
    unknown = sorted(set(answers) - set(ids))
    if missing or unknown:
        raise DataError(f"{predictions}: {len(missing)} records of {data_path} have no answer (first: {missing[:5]}) "
                        f"and {len(unknown)} answers match no record (first: {unknown[:5]}); ids are the data "
                        "file's own (qid, study id); check --split / --format")
    items, summary = score_items(records, [answers[i] for i in ids], protocol, task)
    out: dict[str, Any] = {"data": str(data_path), "predictions": str(predictions), "task": task, "n": len(items)}
    if task == "vqa":
        out |= {"protocol": protocol, "overall": summary["score"], "closed": summary["closed"]["accuracy"],
                "open": summary["open"]["score"], "n_closed": summary["closed"]["n"],
                "n_open": summary["open"]["n"], "rules": list(get_protocol(protocol).rules)}
    else:
        out |= {k: summary[k] for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "meteor",
                                        "meteor_skipped")}
    out |= {"summary": summary, "items": items}
    if report:
        with atomic_file(report, overwrite=True) as tmp:
            tmp.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out


def rescore_text(res: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    if res["task"] == "vqa":
        return (f"{res['data']}: {res['n']} answers scored with protocol {res['protocol']}: overall "
                f"{_pct(res['overall'])}, closed {_pct(res['closed'])} (n={res['n_closed']}), open "
                f"{_pct(res['open'])} (n={res['n_open']})")
    meteor = "skipped" if res["meteor"] is None else _pct(res["meteor"])
    return (f"{res['data']}: {res['n']} reports: BLEU-1 {_pct(res['bleu_1'])}, BLEU-2 {_pct(res['bleu_2'])}, "
            f"BLEU-3 {_pct(res['bleu_3'])}, BLEU-4 {_pct(res['bleu_4'])}, ROUGE-L {_pct(res['rouge_l'])}, "
            f"CIDEr {res['cider']:.3f}, METEOR {meteor}")

"""`edgemed demo`: the whole pipeline on the embedded default image model and the bundled synthetic data.

Materialise the model, generate the data, measure held-out accuracy before fine-tuning, fine-tune (LoRA on CPU,
QLoRA on CUDA), merge, export GGUF (f16, q8_0, q4_k_m, q4_0), the adapter form (q4_k_m and q4_0 base + the run's
f16 LoRA) and ONNX (int8, int4), run parity and evaluation on every export, turn each export into a verified bundle,
and write a report with plots. Offline throughout.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemed.console import log_path
from edgemed.errors import ArtifactError

GGUF_QUANTS = ("f16", "q8_0", "q4_k_m", "q4_0")
# the adapter form (export gguf RUN_DIR): the base at these quants + the run's LoRA as an f16 llama.cpp adapter, set
# beside the merged-then-quantized rows above at the same quants
ADAPTER_QUANTS = ("q4_k_m", "q4_0")
# int4 keeps the fine-tune as low-rank factors beside the 4-bit base (edgemed.export.onnx_quant): merged and
# rounded to 4 bits it failed parity on this model (KL 1.87, top-1 55%)
ONNX_QUANTS = ("int8", "int4")
REPORT_QUANTS = ("q8_0", "q4_k_m")  # the report model's GGUF exports, scored like the VQA ones
REPORT_TEST = 48  # test studies the report step scores (generation is the slow part: up to 48 tokens each)
SPEED_PROMPT = "List the main causes of chest pain in adults and explain how each is diagnosed."
ANSWER_TOKENS = 6  # the demo's answers are one word and the end of turn; a rambling base model is cut short


@dataclass
class Row:
    """One line of the summary: a model or an export file."""

    name: str
    backend: str
    path: Path
    quant: str | None = None
    accuracy: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    size_mb: float | None = None
    decode_tok_s: float | None = None
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)  # scored answers, for retention


class Steps:
    """Numbered progress lines with the time each step took."""

    def __init__(self, total: int):
        from rich.console import Console

        from edgemed.console import user_err

        # a report wider than 80 columns when not on a terminal (CI logs, nohup), rich's own width otherwise
        err = user_err()
        self.console = Console(file=err, width=None if err.isatty() else 140)
        self.total = total
        self.n = 0
        self.times: dict[str, float] = {}

    @contextmanager
    def step(self, title: str):
        self.n += 1
        self.console.print(f"[bold cyan][{self.n}/{self.total}][/] {title}")
        t0 = time.time()
        yield
        self.times[title] = time.time() - t0
        self.console.print(f"      done in {self.times[title]:.0f} s")


def recipe_path() -> Path:
    return Path(__file__).parent / "recipes" / "demo.yaml"


def _size_mb(*files: Path) -> float:
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 1e6, 1)


def decode_speed(backend: Any, max_tokens: int = 48) -> float:
    """Decode tokens/s of a backend: a fixed number of tokens after the first (end of turn ignored, as llama-bench
    does; a fine-tuned model answers in one word, which would time only the prompt)."""
    from edgemed.backends.base import GenParams

    prompt = backend.render(SPEED_PROMPT)
    "".join(backend.generate(prompt, params=GenParams(max_tokens=4, ignore_eos=True)))  # warm-up
    t0 = time.perf_counter()
    first, pieces = None, []
    for piece in backend.generate(prompt, params=GenParams(max_tokens=max_tokens, ignore_eos=True)):
        first = first or time.perf_counter()
        pieces.append(piece)
    n = len(backend.tokenize("".join(pieces))) - len(backend.tokenize(""))
    return round((n - 1) / max(time.perf_counter() - (first or t0), 1e-9), 1)


def measure(row: Row, records: list[Any], speed: bool = True) -> None:
    """Accuracy (and decode speed) of one model or export file."""
    from edgemed.backends import open_model
    from edgemed.evaluate import evaluate

    kw = {"quant": row.quant} if row.backend == "llamacpp" else {}
    backend = open_model(row.path, **kw)
    try:
        res = evaluate(backend, records, max_tokens=ANSWER_TOKENS)
        o = res["overall"]
        row.accuracy = {"overall": o["score"], "closed": o["closed"]["accuracy"], "open": o["open"]["exact"],
                        "n": o["n"]}
        row.items = res["predictions"]
        if speed:
            row.decode_tok_s = decode_speed(backend)
    finally:
        backend.close()


def run_demo(out: Path | str = Path("edgemed-demo"), *, overwrite: bool = False, steps: int | None = None,
             test_images: int = 24, onnx: bool = True) -> Path:
    """Run the whole pipeline into ``out`` and return the report path."""
    import shutil

    from edgemed import embedded
    from edgemed.artifacts import read_manifest
    from edgemed.data import generate_demo_set, read_dataset
    from edgemed.export.auto_quant import fresh_float_export
    from edgemed.export.gguf import export_gguf
    from edgemed.merge import merge
    from edgemed.parity import run_parity
    from edgemed.recipe import load_recipe
    from edgemed.train import finetune

    out = Path(out).absolute()
    if out.exists():
        if not overwrite:
            raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    s = Steps(12 if onnx else 11)
    t_start = time.time()
    rows: list[Row] = []
    with s.step("check this machine (edgemed doctor)"):
        machine = _check_machine()
        s.console.print(f"      {machine}")
    with s.step("embedded default image model (SmolLM2-135M decoder + random vision tower)"):
        base = embedded.materialize(embedded.IMAGE)
    with s.step("synthetic phantom-radiograph VQA set"):
        data = generate_demo_set(out / "data", n_val=16, n_test=test_images)
        test = read_dataset(data["test"])
    with s.step(f"held-out accuracy before fine-tuning ({len(test)} questions, PyTorch)"):
        before = Row("base (before fine-tuning)", "pytorch", base)
        measure(before, test, speed=False)
        rows.append(before)
    overrides = [f"stages.0.data.train={data['train']}", f"stages.0.data.validation={data['validation']}"]
    if steps:
        overrides.append(f"stages.0.max_steps={steps}")
    recipe = load_recipe(recipe_path(), overrides)
    with s.step("fine-tune: projector + LoRA on the decoder, vision tower frozen"):
        run = finetune(recipe, out / "run")
    with s.step("merge the adapter into the fp32 weights"):
        model = merge(run, out / "model")
        tuned = Row("fine-tuned (merged, PyTorch fp32)", "pytorch", model, size_mb=_size_mb(
            *model.glob("*.safetensors")))
        measure(tuned, test)
        rows.append(tuned)
    with s.step(f"export GGUF ({', '.join(GGUF_QUANTS)}) and parity"):
        gguf = export_gguf(model, list(GGUF_QUANTS), out / "gguf")
        gguf_parity = run_parity(gguf, reference=model, adapter=run, report=out / "parity-gguf.json", max_probes=16,
                                 float_export=fresh_float_export)
        s.console.print(gguf_parity.table())
    with s.step(f"export GGUF base ({', '.join(ADAPTER_QUANTS)}) + f16 LoRA adapter, parity against the run"):
        adapted = export_gguf(run, list(ADAPTER_QUANTS), out / "gguf-adapter")
        adapted_parity = run_parity(adapted, report=out / "parity-gguf-adapter.json", max_probes=16,
                                    float_export=fresh_float_export)  # no reference: the run itself (PyTorch)
        s.console.print(adapted_parity.table())
    onnx_dirs: dict[str, tuple[Path, Any]] = {}
    if onnx:
        with s.step(f"export ONNX ({', '.join(ONNX_QUANTS)}) and parity"):
            from edgemed.export.onnx import export_onnx

            for q in ONNX_QUANTS:
                folder = export_onnx(model, q, out / f"onnx-{q}")
                result = run_parity(folder, reference=model, report=out / f"parity-onnx-{q}.json", max_probes=16,
                                    float_export=fresh_float_export)
                s.console.print(result.table())
                onnx_dirs[q] = (folder, result)
    with s.step("accuracy and decode speed of every export"):
        mmproj = sorted(gguf.glob("mmproj*.gguf"))
        for q in GGUF_QUANTS:
            row = Row(f"GGUF {q} (llama.cpp)", "llamacpp", gguf, quant=q,
                      size_mb=_size_mb(gguf / f"model-{q}.gguf", *mmproj))
            row.parity = _parity_row(gguf_parity, q)
            measure(row, test)
            rows.append(row)
        manifest = read_manifest(adapted)
        mmproj = sorted(adapted.glob("mmproj*.gguf"))
        for q in ADAPTER_QUANTS:
            row = Row(f"GGUF {q} + f16 adapter (llama.cpp)", "llamacpp", adapted, quant=q,
                      size_mb=_size_mb(adapted / manifest["models"][q], *mmproj,
                                       *(adapted / f for f in manifest["adapters"].values())))
            row.parity = _parity_row(adapted_parity, q)
            measure(row, test)
            rows.append(row)
        for q, (folder, result) in onnx_dirs.items():
            row = Row(f"ONNX {q} (onnxruntime)", "onnx", folder, quant=q,
                      size_mb=_size_mb(*[p for p in folder.rglob("*") if p.suffix in (".onnx", ".data")]))
            row.parity = _parity_row(result, q)
            measure(row, test)
            rows.append(row)
    with s.step(f"report generation: the VQA model fine-tuned on findings reports, GGUF "
                f"({', '.join(REPORT_QUANTS)}), BLEU / ROUGE-L / CIDEr retention (up to {REPORT_TEST} test studies)"):
        reports = report_task(model, data["reports"], out, steps)
        s.console.print(reports.table())
    with s.step("bundles (sealed manifests, model cards) and report"):
        _finalize(gguf, out / "parity-gguf.json", rows, "llamacpp")
        _finalize(adapted, out / "parity-gguf-adapter.json", rows, "llamacpp")
        for q, (folder, _) in onnx_dirs.items():
            _finalize(folder, out / f"parity-onnx-{q}.json", rows, "onnx")
        report = write_report(out, rows, run, time.time() - t_start, machine, reports)
    s.console.print(summary_table(rows))
    log = log_path()
    s.console.print(f"\nreport: {report}\ntotal: {time.time() - t_start:.0f} s\n"
                    + (f"log:    {log} (the libraries' own output)\n" if log else "")
                    + f"machine: {machine}\n"
                    f"next:   edgemed serve {gguf}   (OpenAI-compatible API on http://127.0.0.1:8080/v1)\n"
                    f"        edgemed ask {gguf} \"Is there a lesion?\" --image {test[0].image}")
    return report


def report_task(vqa_model: Path, reports: Path, out: Path, steps: int | None = None,
                max_tokens: int | None = None) -> Any:
    """Fine-tune the merged VQA model on the demo set's findings reports (recipes/demo_report.yaml), merge it,
    export it to GGUF and score the reports of the model before, the fine-tune and each export (BLEU-1..4,
    ROUGE-L, CIDEr-D with pycocoevalcap's scorers; edgemed.evaluate). Returns the EvalResult."""
    from edgemed.evaluate import evaluate_many
    from edgemed.export.gguf import export_gguf
    from edgemed.merge import merge
    from edgemed.recipe import load_recipe
    from edgemed.train import finetune

    overrides = [f"model.path={vqa_model}", f"stages.0.data.train={reports}", f"stages.0.data.validation={reports}"]
    if steps:
        overrides.append(f"stages.0.max_steps={steps}")
    recipe = load_recipe(Path(__file__).parent / "recipes" / "demo_report.yaml", overrides)
    run = finetune(recipe, out / "report-run")
    model = merge(run, out / "report-model")
    gguf = export_gguf(model, list(REPORT_QUANTS), out / "report-gguf")
    return evaluate_many([vqa_model, model, gguf], reports, task="report", split="test", limit=REPORT_TEST,
                         max_tokens=max_tokens, report=out / "eval-report.json")


def report_lines(res: Any) -> list[str]:
    """The report-generation table of the demo report: each row's scores, and its ROUGE-L change against the row it
    is compared with (an export against its model) with the paired bootstrap 95% CI."""
    if res is None:
        return []
    out = ["", f"Report generation ({res.results[0]['overall']['n']} test studies, reports cleaned as R2Gen does; "
           "the change is in ROUGE-L points with its paired bootstrap 95% CI):", "",
           "| model / export | BLEU-1 | BLEU-4 | ROUGE-L | CIDEr | ROUGE-L change | vs |",
           "|---|---|---|---|---|---|---|"]
    for r in res.results:
        o, ret = r["overall"], r.get("retention")
        change = "-" if not ret else (f"{r['delta_points']:+.1f} ({100 * ret['ci_low']:+.1f} to "
                                      f"{100 * ret['ci_high']:+.1f})")
        out.append(f"| {r['label']} | {_num(o.get('bleu_1'))} | {_num(o.get('bleu_4'))} | {_num(o.get('rouge_l'))} | "
                   f"{_num(o.get('cider'))} | {change} | {r.get('vs') or '-'} |")
    return out


def _check_machine() -> str:
    """Run the doctor's checks (the runtime probes too, in child processes); stop here if a step would fail."""
    from edgemed.doctor import run_doctor

    report = run_doctor()
    bad = [c for c in report.checks if c.required and not c.ok]
    if bad:
        raise ArtifactError("this machine cannot run the demo: " + "; ".join(
            f"{c.name}: {c.detail} (fix: {c.fix})" for c in bad) + "; see `edgemed doctor`")
    return report.summary()


def _parity_row(result: Any, quant: str) -> dict[str, Any]:
    for r in result.rows:
        if r.quant in (quant, f"onnx-{quant}"):  # parity names ONNX quants onnx-int8, onnx-int4
            return {"passed": r.passed, "top1": r.metrics.top1, "kl_mean": r.metrics.kl_mean,
                    "image_cos": r.metrics.image_cos}
    return {}


def _finalize(folder: Path, parity_json: Path, rows: list[Row], backend: str) -> None:
    from edgemed.bundle import PARITY_REPORT, finalize

    ev = {r.name: r.accuracy for r in rows if r.backend in (backend, "pytorch")}
    (folder.parent / f"eval-{folder.name}.json").write_text(json.dumps(ev, indent=2))
    mine = [r for r in rows if r.path == folder]
    finalize(folder, {PARITY_REPORT: parity_json, "eval.json": folder.parent / f"eval-{folder.name}.json"},
             summary={r.name: f"accuracy {_pct(r.accuracy.get('overall'))}, parity "
                      f"{'pass' if r.parity.get('passed') else 'FAIL'}{_retention_note(r, rows)}" for r in mine})


def _retention_note(row: Row, rows: list[Row]) -> str:
    """"; vs the fine-tuned model: <change, CI, flips, McNemar p>" for the model card, or "" without answers."""
    from edgemed.scoring import compare

    ref = next((r for r in rows if r.backend == "pytorch" and r.name.startswith("fine-tuned") and r.items), None)
    if ref is None or not row.items or len(row.items) != len(ref.items):
        return ""
    return f"; vs the fine-tuned PyTorch model: {compare(ref.items, row.items).text()}"


def _retention_lines(rows: list[Row]) -> list[str]:
    """Each export against the fine-tuned PyTorch model: change with its paired bootstrap 95% CI, flipped answers
    and McNemar's exact p (edgemed.scoring.compare)."""
    from edgemed.scoring import compare

    ref = next((r for r in rows if r.backend == "pytorch" and r.name.startswith("fine-tuned") and r.items), None)
    if ref is None:
        return []
    out = ["", "Retention against the fine-tuned PyTorch model (same questions; 95% CI by paired bootstrap):", ""]
    for r in rows:
        if r.backend != "pytorch" and len(r.items) == len(ref.items):
            out.append(f"- {r.name}: {compare(ref.items, r.items).text()}")
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def summary_table(rows: list[Row]) -> Any:
    from rich.table import Table

    t = Table(title="edgemed demo: held-out accuracy, parity and speed")
    cols = ("model / export", "accuracy", "closed", "open", "top-1", "KL mean", "parity", "size MB", "decode tok/s")
    for col in cols:
        t.add_column(col, justify="left" if col == "model / export" else "right")
    for r in rows:
        p = r.parity
        t.add_row(r.name, _pct(r.accuracy.get("overall")), _pct(r.accuracy.get("closed")),
                  _pct(r.accuracy.get("open")), _pct(p.get("top1")) if p else "-", _num(p.get("kl_mean"), ".4f"),
                  ("pass" if p.get("passed") else "FAIL") if p else "-", _num(r.size_mb, ".1f"),
                  _num(r.decode_tok_s, ".1f"))
    return t


def write_report(out: Path, rows: list[Row], run: Path, seconds: float, machine: str = "",
                 reports: Any = None) -> Path:
    """Markdown report with the loss curve, accuracy per format and size against accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "loss.png").write_bytes((run / "loss.png").read_bytes())
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.barh([r.name for r in rows][::-1], [100 * (r.accuracy.get("overall") or 0) for r in rows][::-1])
    ax.set_xlabel("held-out accuracy (%)")
    ax.set_xlim(0, 100)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for r in rows:
        if r.size_mb:
            ax.scatter(r.size_mb, 100 * (r.accuracy.get("overall") or 0))
            ax.annotate(r.quant or "fp32", (r.size_mb, 100 * (r.accuracy.get("overall") or 0)))
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(out / "size_vs_accuracy.png")
    plt.close(fig)
    log = log_path()
    lines = ["# edgemed demo report", "", f"Total time: {seconds:.0f} s.", "", f"Machine: {machine}", "",
             *([f"Log of the libraries' output: {log}", ""] if log else []),
             "| model / export | accuracy | closed | open | top-1 | KL mean | parity | size MB | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.parity
        lines.append(f"| {r.name} | {_pct(r.accuracy.get('overall'))} | {_pct(r.accuracy.get('closed'))} | "
                     f"{_pct(r.accuracy.get('open'))} | {_pct(p.get('top1')) if p else '-'} | "
                     f"{_num(p.get('kl_mean'), '.4f')} | {('pass' if p.get('passed') else 'FAIL') if p else '-'} | "
                     f"{_num(r.size_mb, '.1f')} | {_num(r.decode_tok_s, '.1f')} |")
    lines += _retention_lines(rows)
    lines += report_lines(reports)
    lines += ["", "![loss](loss.png)", "", "![accuracy](accuracy.png)", "", "![size](size_vs_accuracy.png)", "",
              "Accuracy: closed questions (yes/no) scored as accuracy, open questions as exact match, over the "
              "held-out test split. Parity: teacher-forced comparison with the merged PyTorch model "
              "(see the parity-*.json reports)."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps([{**{k: v for k, v in r.__dict__.items() if k != "items"},
                                                    "path": str(r.path)} for r in rows], indent=2))
    return report

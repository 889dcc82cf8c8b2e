"""Auto-quant: export candidate GGUF quants, check each with parity (and eval retention), keep the smallest that
passes. The one module that joins the exporters to the checkers: the exporters import neither parity nor eval, and
parity imports no exporter (it compares folders; :func:`fresh_float_export` is what ``edgemed parity`` hands it
for the conversion stage of localisation)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgemed.artifacts import MANIFEST, atomic_dir, read_manifest, write_manifest
from edgemed.errors import ArtifactError, ParityError
from edgemed.export.imatrix import IMATRIX_FILE

DEFAULT_CANDIDATES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0")


def fresh_float_export(model_dir: Path, kind: str, out: Path) -> Path:
    """A float export of ``model_dir`` in the runtime of ``kind``: GGUF f16 or ONNX fp32 (parity's conversion stage:
    the float file a quantised-only export folder lacks)."""
    if kind == "gguf":
        from edgemed.export.gguf import export_gguf

        return export_gguf(model_dir, ["f16"], out)
    if kind == "onnx":
        from edgemed.export.onnx import export_onnx

        return export_onnx(model_dir, "fp32", out)
    raise ParityError(f"no float export for artifact kind {kind!r}; parity localises gguf and onnx exports")


def auto_quant(model_dir: Path | str, out: Path | str, overwrite: bool = False,
               candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
               thresholds: tuple[str, ...] | list[str] = (), data: Path | str | None = None,
               max_drop: float = 1.0, limit: int | None = 64, max_probes: int = 32,
               n_threads: int | None = None, calibration: Path | str | None = None, mmproj_quant: str = "f16",
               adapters: bool = True, calibrate: bool = True, calibration_samples: int | None = None,
               adapter_quant: str = "f16", chat_template: str | None = None, imatrix_types: str | None = None
               ) -> Path:
    """Export the candidate quants, keep the smallest whose parity (and, with ``data``, eval retention) passes.

    Args:
        model_dir: the merged model folder.
        out: the GGUF export folder to write (it holds the chosen quant and the image projector).
        overwrite: replace ``out``.
        candidates: quant types to try.
        thresholds: parity threshold overrides (``key=value``).
        data: VQA JSONL for the retention budget (default: the run's validation split, if any).
        max_drop: largest allowed drop of the overall eval score, in points, against the PyTorch model.
        limit: evaluate at most this many records.
        max_probes: parity probes.
        n_threads: CPU threads per runtime.
        calibration: calibration data (default: the run's training data); with it each quant is tried
            calibrated and uncalibrated, by the same budget.
        mmproj_quant: file type of the image projector (image models), as ``export gguf --mmproj-quant``.
        calibrate: False tries uncalibrated candidates only (``--no-calibration``).
        imatrix_types: None tries the calibrated files both ways, every quantized tensor weighted ("all") and
            the legacy fallback blocks unweighted ("k-quants", from the same matrices), where the files hold such
            blocks; "all" or "k-quants" tries that one only.
        calibration_samples, adapter_quant, chat_template: passed to every candidate's ``export_gguf``.
        adapters: for a merged LoRA fine-tune whose run is still there, also try each quant of the base with the
            run's LoRA as an f16 llama.cpp adapter (``export gguf RUN_DIR``): at 4 bits the merged weights can round
            the fine-tune away where base + adapter keeps it. At each quant the merged file is tried first (it is
            smaller by the adapter file).

    Returns:
        The export folder; its manifest holds ``auto_quant``: the choice and why each other candidate lost.
    """
    from edgemed.export.gguf import export_gguf
    from edgemed.export.imatrix import default_calibration
    from edgemed.parity import SIZE_ORDER, run_parity
    from edgemed.parity.probes import run_manifest_of

    model_dir = Path(model_dir)
    bad = [q for q in candidates if q not in SIZE_ORDER]
    if bad:
        raise ParityError(f"unknown quant(s) {', '.join(bad)} for auto-quant; choose from {', '.join(SIZE_ORDER)}")
    order = sorted(dict.fromkeys(candidates), key=SIZE_ORDER.index)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    if data is None:
        run = run_manifest_of(model_dir, None)
        vals = [v.get("validation") for v in ((run or {}).get("data") or {}).values() if v and v.get("validation")]
        data = next((Path(v) for v in vals if Path(v).is_file() and Path(v).suffix == ".jsonl"), None)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.auto-", dir=out.absolute().parent))
    try:
        # calibrated and uncalibrated candidates, judged by the same budget: smallest passing wins, calibrated first
        common = {"mmproj_quant": mmproj_quant, "chat_template": chat_template,
                  "calibration_samples": calibration_samples}
        calibrated = calibrate and (calibration is not None or default_calibration(model_dir) is not None)
        trials: dict[str, Path] = {}
        if calibrated:
            first = "k-quants" if imatrix_types == "k-quants" else "all"
            trials[_MODES[first]] = export_gguf(model_dir, order, work / _MODES[first], calibration=calibration,
                                                imatrix_types=first, **common)
            if imatrix_types is None and _has_legacy_blocks(trials["calibrated"]):
                # the same matrices (the first trial's imatrix.gguf), the fallback blocks rounded unweighted
                trials["calibrated-k"] = export_gguf(model_dir, order, work / "calibrated-k",
                                                     calibration=trials["calibrated"] / IMATRIX_FILE,
                                                     imatrix_types="k-quants", **common)
        trials["uncalibrated"] = export_gguf(model_dir, order, work / "uncalibrated", calibrate=False, **common)
        run = lora_run(model_dir) if adapters else None
        if run is not None:
            trials["adapter"] = export_gguf(run, order, work / "adapter", calibration=calibration,
                                            calibrate=calibrate, adapter_quant=adapter_quant, **common)
        results = {mode: run_parity(t, reference=model_dir, thresholds=thresholds, max_probes=max_probes,
                                    localise=False, n_threads=n_threads) for mode, t in trials.items()}
        chosen, mode, decisions = _choose(order, trials, results, model_dir, data, max_drop, limit, n_threads)
        _keep(trials[mode], out, overwrite, chosen,
              {"chosen": chosen, "form": _FORMS[mode], "calibrated": mode != "uncalibrated",
               **({"imatrix_types": "k-quants"} if mode == "calibrated-k" else {}), "tried": decisions,
               "eval_data": str(data) if data else None, "max_drop_points": max_drop,
               "parity": results[mode].to_dict()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out.absolute()


_FORMS = {"calibrated": "merged", "calibrated-k": "merged", "uncalibrated": "merged",
          "adapter": "base + f16 LoRA adapter"}
_MODES = {"all": "calibrated", "k-quants": "calibrated-k"}  # --imatrix-types -> trial name


def _has_legacy_blocks(folder: Path) -> bool:
    """Whether a calibrated trial's files weighted any legacy q4_0/q5_0/... tensor beside k-quant ones (only then
    does the "k-quants" form differ from both the calibrated and the uncalibrated files)."""
    import gguf

    from edgemed.export.ggml_quant import LEGACY_TYPES
    from edgemed.gguf_header import read_header  # the header alone (gguf-py's reader takes seconds a file)

    for name in read_manifest(folder)["models"].values():
        kinds = {gguf.GGMLQuantizationType(t.ggml_type).name for t in read_header(folder / name).tensors}
        if kinds & (LEGACY_TYPES - {"Q8_0"}) and kinds - LEGACY_TYPES - {"F32", "F16", "BF16"}:
            return True
    return False


def lora_run(model_dir: Path) -> Path | None:
    """The run folder a merged model came from, when it is still there and holds a LoRA adapter; else None."""
    from edgemed.manifest import find, run_of
    from edgemed.modeling import ADAPTER

    m = find(model_dir)
    if m is None or m.kind != "model":
        return None
    run = run_of(m)
    folder = run.folder if run is not None else None
    return folder if folder is not None and (folder / ADAPTER).is_dir() else None


def _choose(order: list[str], trials: dict[str, Path], results: dict[str, Any], model_dir: Path,
            data: Path | str | None, max_drop: float, limit: int | None, n_threads: int | None
            ) -> tuple[str, str, list[dict[str, Any]]]:
    """Smallest quant first; at one quant the merged files (one size) closest to the reference first, by KL mean,
    so a file nearer on that figure is never passed over for a farther one, then the larger base + adapter form.
    The first trial that passes parity and the eval budget wins. Returns (quant, mode, every decision made up
    to it)."""
    decisions: list[dict[str, Any]] = []
    ref_score = None
    for q in order:
        rows = {mode: next(r for r in results[mode].rows if r.quant == q) for mode in trials}
        ranked = sorted(trials, key=lambda m: (_FORMS[m] != "merged", rows[m].metrics.kl_mean))
        for mode in ranked:
            trial, row = trials[mode], rows[mode]
            why = list(row.failures)
            if not why and data is not None:
                from edgemed.evaluate import evaluate_many

                if ref_score is None:
                    ref_score = evaluate_many([model_dir], data, limit=limit, n_threads=n_threads
                                              ).results[0]["overall"]["score"]
                score = _eval_quant(trial, q, data, limit, n_threads)
                drop = 100 * (ref_score - score)
                if drop > max_drop:
                    why.append(f"eval: score {100 * score:.1f} is {drop:.1f} points below PyTorch "
                               f"{100 * ref_score:.1f} (budget {max_drop})")
            decisions.append({"quant": q, "calibrated": mode != "uncalibrated", "form": _FORMS[mode],
                              **({"imatrix_types": "k-quants"} if mode == "calibrated-k" else {}),
                              "accepted": not why,
                              "reasons": why, "kl_mean": row.metrics.kl_mean, "top1": row.metrics.top1,
                              "flip_rate": row.metrics.flip_rate})
            if not why:
                return q, mode, decisions
    lines = "; ".join(f"{d['quant']}: {d['reasons'][0]}" for d in decisions)
    raise ParityError(f"no candidate quant passes the budgets ({lines}); export f16 or relax --threshold")


def _keep(trial: Path, out: Path, overwrite: bool, chosen: str, record: dict[str, Any]) -> None:
    """Write ``out``: the trial folder's files with only the chosen quant's model file, and why it was chosen."""
    m = read_manifest(trial)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in trial.iterdir():
            if f.name == MANIFEST or (f.name.startswith("model-") and f.name != m["models"][chosen]):
                continue
            shutil.copy2(f, tmp / f.name)
        rest = {k: v for k, v in m.items() if k not in ("edgemed_manifest", "kind", "created", "libraries",
                                                        "files", "quants", "models")}
        write_manifest(tmp, "gguf", **rest, quants=[chosen], models={chosen: m["models"][chosen]},
                       auto_quant=record)
        (tmp / "auto_quant.txt").write_text(_explain(chosen, record["tried"]) + "\n")


def _eval_quant(folder: Path, quant: str, data: Path | str, limit: int | None, n_threads: int | None) -> float:
    from edgemed.backends import open_model
    from edgemed.data import read_vqa_jsonl
    from edgemed.evaluate import evaluate

    b = open_model(folder, quant=quant, **({"n_threads": n_threads} if n_threads else {}))
    try:
        records = read_vqa_jsonl(data)[:limit] if limit else read_vqa_jsonl(data)
        return evaluate(b, records)["overall"]["score"]
    finally:
        b.close()


def _explain(chosen: str, decisions: list[dict[str, Any]]) -> str:
    last = decisions[-1]
    how = ("calibrated" if last.get("calibrated") else "uncalibrated") + (
        ", k-quants only" if last.get("imatrix_types") == "k-quants" else "") + (
        f", {last['form']}" if last.get("form", "merged") != "merged" else "")
    lines = [f"auto-quant chose {chosen} ({how}): the smallest candidate that passed parity and eval budgets."]
    for d in decisions:
        if not d["accepted"]:
            cal = (" (calibrated, k-quants only)" if d.get("imatrix_types") == "k-quants" else
                   " (calibrated)" if d.get("calibrated") else "")
            form = f" ({d['form']})" if d.get("form", "merged") != "merged" else ""
            lines.append(f"{d['quant']}{cal}{form} rejected: {'; '.join(d['reasons'])}")
    return "\n".join(lines)

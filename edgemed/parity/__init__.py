"""Parity: does an export still behave like the PyTorch model it came from?

``run_parity(export_dir)`` renders a probe set (the run's validation questions plus general medical prompts) with
each runtime's own chat template and compares the export with the PyTorch reference:

* identity: chat template text and rendered prompts, token ids of the same text, BOS count, vocabulary width;
* teacher-forced, per position of prompt + the reference's greedy answer: top-1 agreement, KL(reference || export)
  (mean, p99, max) and the largest logit difference;
* free-running: greedy exact-match rate and the first token where the answers part, on at most
  :data:`GREEDY_PROBES` probes spread over the set, each at most :data:`GREEDY_TOKENS` tokens;
* image models: cosine similarity of the projected image embeddings.

The reference's side (answers, logits, image embeddings) is computed once, batched, and cached on disk by content
hash (:mod:`edgemed.parity.reference`): every export and auto-quant candidate is compared against the same one.

Each file of the export (a GGUF folder may hold several quants) gets a row, judged against the thresholds of its
quant type (:data:`THRESHOLDS`, documented and justified in ``docs/parity.md``). KL divergence is the primary
figure: top-1 agreement is noisy on small models whose logits often nearly tie. When a row fails, the check
localises the loss: tokenizer/template, merge (adapter vs merged), conversion (merged vs a float export) or
quantisation (float export vs the quantised one).

The package: ``probes`` (what is asked), ``metrics`` (the numbers), ``thresholds`` (the bars and the judgement),
``reference`` (the reference's turns and their cache), ``compare`` (one pass over the runtimes), ``localise``
(which stage lost it), ``report`` (rows, table, JSON).
Parity opens folders with :func:`edgemed.backends.open_model` and imports no exporter and no evaluator.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from edgemed import prompting
from edgemed.artifacts import read_manifest
from edgemed.backends import open_model, runtime_of
from edgemed.errors import ParityError
from edgemed.machine import machine_summary, runtime_versions
from edgemed.modeling import weights_dir
from edgemed.parity.compare import (
    GREEDY_PROBES,
    GREEDY_TOKENS,
    Reference,
    candidates,
    gguf_file_checks,
    judged_row,
    opened,
)
from edgemed.parity.localise import FloatExport, Localiser, merge_row
from edgemed.parity.metrics import Accumulator, Metrics, PositionFigures, RefLogits, compare_logits, mean_cosine
from edgemed.parity.probes import GENERAL_PROMPTS, Probe, default_probes, disjoint_from_calibration, read_probes
from edgemed.parity.report import ParityResult, Row
from edgemed.parity.thresholds import (
    DECIDED_MARGIN,
    EXPECTED,
    FLOAT_TYPES,
    KEYS,
    LOSSY_BUDGET,
    SIZE_ORDER,
    THRESHOLDS,
    Thresholds,
    judge,
    thresholds_for,
    warnings_for,
)

log = logging.getLogger(__name__)

__all__ = ["DECIDED_MARGIN", "EXPECTED", "FLOAT_TYPES", "GENERAL_PROMPTS", "GREEDY_PROBES", "GREEDY_TOKENS", "KEYS",
           "LOSSY_BUDGET", "LOSSY_MMPROJ", "SIZE_ORDER", "THRESHOLDS", "Accumulator", "FloatExport", "Metrics",
           "ParityResult", "PositionFigures", "Probe", "RefLogits", "Row", "Thresholds", "compare_logits",
           "default_probes", "judge", "judged_as", "judged_row", "mean_cosine", "read_probes", "run_parity",
           "thresholds_for", "warnings_for"]


LOSSY_MMPROJ = ("q8_0", "q5_0")  # mmproj types that round the vision tower (edgemed.export.gguf_mmproj)


def judged_as(quant: str, manifest: dict[str, Any], reference_dtype: str = "float32") -> str:
    """The type whose thresholds judge a file: a float text model beside a rounded mmproj is a lossy export as a
    whole (its image positions carry the mmproj's rounding), so it gets the lossy budget, not the float gates that
    exist to catch a mis-written tensor. Against a 16-bit reference a float file is judged by the bf16 bounds: the
    reference's own rounding is then part of every difference."""
    if quant in FLOAT_TYPES and manifest.get("mmproj") and manifest.get("mmproj_quant") in LOSSY_MMPROJ:
        return str(manifest["mmproj_quant"]) if manifest["mmproj_quant"] in THRESHOLDS else "q8_0"
    if quant in FLOAT_TYPES and reference_dtype != "float32":
        return "bf16"
    return quant


def run_parity(export_dir: Path | str, reference: Path | str | None = None, adapter: Path | str | None = None,
               probes: Path | str | None = None, report: Path | str | None = None,
               thresholds: tuple[str, ...] | list[str] = (), max_probes: int = 32, localise: bool = True,
               n_threads: int | None = None, chat_template: str | None = None,
               float_export: FloatExport | None = None, reference_dtype: str = "auto") -> ParityResult:
    """Compare every file of an export with the PyTorch model it came from.

    Args:
        export_dir: a gguf or onnx export folder (or a model folder, compared as f32).
        reference: the merged model folder (default: the export manifest's parent).
        adapter: the run folder (base + LoRA): adds the adapter-vs-merged stage to localisation.
        probes: probe JSONL (default: the run's validation split plus general medical prompts).
        report: write the JSON report here (replaced if it exists: a report is refreshed on every run).
        thresholds: ``key=value`` or ``quant.key=value`` overrides of :data:`THRESHOLDS`.
        max_probes: at most this many probes.
        localise: on failure, compare the stages to say which one lost the behaviour.
        n_threads: CPU threads per runtime (default: each runtime's own choice). On a machine whose cores are
            busy with other work, 1 is often several times faster: spinning thread pools wait on each other.
        chat_template: template text every runtime renders with (``--chat-template``), instead of the folders'.
        float_export: makes a float export of the reference (``(model_dir, "gguf" | "onnx", out) -> folder``) for
            localisation when the export folder holds no float file; parity itself never exports
            (:func:`edgemed.export.auto_quant.fresh_float_export` is the one ``edgemed parity`` passes).
        reference_dtype: float32, bfloat16 or float16 for the PyTorch reference; "auto" (default) takes float32
            where it fits in memory, else the checkpoint's own 16-bit type (a 4B model's fp32 reference alone is
            17 GB). A 16-bit reference carries its own rounding, so float exports are then judged by the bf16
            bounds (measured bf16-vs-fp32 noise); the report says which dtype was used.

    Returns:
        The result; ``passed`` is False when any row fails its thresholds.
        A model without a chat template is probed with plain text prompts, and the result says so.
    """
    t0 = time.time()
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    cands = candidates(export_dir, manifest)
    ref_dir = _resolve_reference(export_dir, manifest, Path(reference) if reference else None)
    _check_same_arch(export_dir, manifest, ref_dir)
    if max_probes < 1:
        raise ParityError(f"--max-probes must be at least 1, got {max_probes}")
    for q in dict.fromkeys([*(q for _, q, _ in cands), "f32"]):  # bad overrides fail before any model loads
        thresholds_for(q, thresholds)
    given = read_probes(probes)[:max_probes] if probes else None  # a bad file fails before any model loads
    ref_dtype = _check_memory(export_dir, ref_dir, reference_dtype)
    kw: dict[str, Any] = {"n_threads": n_threads} if n_threads else {}
    if chat_template is not None:
        kw["chat_template"] = chat_template
    # its weights load only when the reference cache misses
    backend = open_model(ref_dir, lazy=True, **kw, **({"dtype": ref_dtype} if ref_dtype != "float32" else {}))
    try:
        plist = given or default_probes(ref_dir, Path(adapter) if adapter else None, backend.is_vision, max_probes)
        plist, calibration = disjoint_from_calibration(manifest, plist, given is not None)
        ref = Reference(backend, ref_dir, plist, thresholds, kw)
        floats = [label for label, q, _ in cands if q in FLOAT_TYPES]
        # float file vs each quantised one: only localisation reads these (auto-quant does not localise)
        pairs = {f"{floats[0]} > {label.split()[-1]}": (floats[0], label)
                 for label, q, _ in cands if floats and q not in FLOAT_TYPES} if localise else {}
        with opened({label: (export_dir, {**ckw, **kw}) for label, _, ckw in cands}) as cand_backends:
            accs, positions = ref.compare(cand_backends, pairs)
        rows = [ref.row(label, q, runtime_of(manifest), accs[label], judge_as=judged_as(q, manifest, ref_dtype))
                for label, q, _ in cands]
        if manifest.get("kind") == "gguf":
            _add_gguf_file_checks(ref, export_dir, manifest, rows)
        result = ParityResult(str(export_dir), str(ref_dir), rows, len(plist), positions, 0.0,
                              prompt_format=prompting.prompt_format(backend.processor), calibration=calibration,
                              runtimes=runtime_versions(), machine=machine_summary(),
                              reference_cache=ref.cache.to_dict() if ref.cache else None,
                              greedy={"probes": len(ref.greedy), "of": len(plist), "max_tokens": GREEDY_TOKENS},
                              reference_dtype=ref_dtype)
        if adapter:  # asked for: a merge that lost the fine-tune would otherwise pass (the export copies it)
            result.merge = merge_row(ref, Path(adapter), ref_dtype)
        passing = [r.quant for r in rows if r.passed and r.quant in SIZE_ORDER]
        result.smallest_passing = min(passing, key=SIZE_ORDER.index) if passing else None
        if localise and not result.passed:
            Localiser(ref, result, export_dir, manifest, cands, accs, pairs, float_export).run()
    finally:
        backend.close()
    result.seconds = time.time() - t0
    if report:
        result.write(report)
    return result


def _add_gguf_file_checks(ref: Reference, export_dir: Path, manifest: dict[str, Any], rows: list[Row]) -> None:
    """Each GGUF row also gets the checks of what its file carries (embedded template, BOS rule)."""
    bos_ref = rows[0].checks["bos_reference"]
    for row in rows:
        checks, fails = gguf_file_checks(export_dir / manifest["models"][row.quant], ref.backend, ref.probes, bos_ref)
        row.checks.update(checks)
        row.failures += fails


REFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_memory(export_dir: Path, ref_dir: Path, reference_dtype: str = "auto") -> str:
    """The reference's dtype, after refusing, before any model loads, a comparison this machine cannot hold
    (edgemed.memory's parity rule: the reference at that dtype and every export file; conservative when the
    reference cache would spare the reference). "auto": float32 where it fits, else the checkpoint's 16-bit type."""
    from edgemed import memory

    if reference_dtype not in REFERENCE_DTYPES:
        raise ParityError(f"unknown reference dtype {reference_dtype!r}; choose one of {', '.join(REFERENCE_DTYPES)}")
    files = [f for f in export_dir.iterdir() if f.suffix in (".gguf", ".onnx", ".data", ".safetensors")]
    weights = weights_dir(ref_dir)
    what = f"parity of {export_dir} against {ref_dir}"
    if reference_dtype == "auto":
        if memory.fits(memory.parity_need(weights, files)):
            return "float32"
        reference_dtype = memory.sixteen_bit_dtype(weights)
        log.warning("%s: the float32 reference does not fit in %.1f GB; using the checkpoint's %s (float exports are "
                    "then judged by the bf16 bounds)", what, (memory.available_bytes() or 0) / memory.GB,
                    reference_dtype)
    memory.require(memory.parity_need(weights, files, reference_dtype), f"{what}, its reference in {reference_dtype},")
    return reference_dtype


def _resolve_reference(export_dir: Path, manifest: dict[str, Any], reference: Path | None) -> Path:
    if reference is None:
        parent = (manifest.get("parent") or {}).get("path")
        if manifest.get("kind") in ("model", "run") or not parent:
            raise ParityError(f"{export_dir}: no reference given and its manifest names no parent model; pass "
                              "--reference MODEL_DIR (the merged PyTorch model it was exported from)")
        reference = Path(parent)
        if not reference.is_dir():
            raise ParityError(f"{export_dir}: its parent model {reference} is gone; pass --reference MODEL_DIR")
    return Path(reference)


def _check_same_arch(export_dir: Path, manifest: dict[str, Any], reference: Path) -> str:
    from edgemed.archs import arch_for_dir

    ref_arch = arch_for_dir(weights_dir(reference)).name
    if manifest.get("kind") in ("model", "run"):
        exp_arch = arch_for_dir(export_dir).name if (export_dir / "config.json").is_file() else manifest.get("arch")
    else:
        exp_arch = manifest.get("arch")
    if exp_arch and exp_arch != ref_arch:
        raise ParityError(f"reference {reference} is a {ref_arch!r} model but {export_dir} holds a {exp_arch!r} "
                          "model; give the model the export was made from as --reference")
    return ref_arch

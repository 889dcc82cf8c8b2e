"""Localisation: when a row fails, say which stage lost the behaviour, in pipeline order: tokenizer/template,
merge (adapter vs merged), conversion (merged vs a float export) or quantisation (float export vs the quantised).

Parity never exports: where the export folder holds no float file, the conversion stage compares a float export
made by the ``float_export`` callable its caller passes (``edgemed parity`` passes
:func:`edgemed.export.auto_quant.fresh_float_export`), or says the stage could not be separated.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed.artifacts import MANIFEST, read_manifest, tree_sha256
from edgemed.backends import runtime_of
from edgemed.errors import EdgemedError, ParityError
from edgemed.memory import MemoryShortError
from edgemed.parity.compare import Reference, candidates
from edgemed.parity.metrics import Accumulator
from edgemed.parity.report import ParityResult, Row
from edgemed.parity.thresholds import FLOAT_TYPES

# (model folder, export kind "gguf" or "onnx", folder to write) -> the float export written there
FloatExport = Callable[[Path, str, Path], Path]

IDENTITY = ("template", "tokenizer", "bos", "vocab")  # causes the tokenizer/template stage explains
BEHAVIOUR = ("weights", "greedy", "image")  # causes a weight-changing stage explains


def stored_16_bit(folder: Path) -> bool:
    """Whether the checkpoint's config names a 16-bit dtype (a merge into it rounds W + BA to 16 bits)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    named = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return named in ("bfloat16", "float16")


def merge_row(ref: Reference, run: Path, reference_dtype: str = "float32") -> Row:
    """The adapter model (run folder: base + LoRA, unmerged) against the merged reference, loaded in the
    reference's dtype. Judged by the f32 bounds where the merged weights are fp32 and loaded so; by the bf16
    bounds where they are 16-bit or the reference is: LoRA applied at run time and LoRA folded into 16-bit
    weights round differently. Measured 2026-12-03 on Qwen2.5-VL-3B (bf16 checkpoint, a sound merge): KL mean
    4.4e-4 with both sides in fp32, 1.1e-3 with the fp32 adapter model against a bf16 reference, and the f32 bounds
    (1e-5) blamed the merge both times."""
    if not (run / MANIFEST).is_file() or read_manifest(run).get("kind") != "run":
        raise ParityError(f"{run}: --adapter must be a run folder (`edgemed finetune` output)")
    load_16 = reference_dtype != "float32"
    judge = "bf16" if load_16 or stored_16_bit(ref.folder) else "f32"
    return ref.compare_folder(f"merge: adapter {run.name}", judge, "pytorch", run,
                              {"dtype": reference_dtype} if load_16 else {})


@dataclass
class Localiser:
    """One localisation of a failed result: the pass that made it (``accs``, ``pairs``) and the export it judged.
    :meth:`run` fills ``result.verdict`` and appends the stages it compared to ``result.localisation``."""

    ref: Reference
    result: ParityResult
    export_dir: Path
    manifest: dict[str, Any]
    cands: list[tuple[str, str, dict[str, Any]]]
    accs: dict[str, Accumulator]
    pairs: dict[str, tuple[str, str]]
    float_export: FloatExport | None = None

    @property
    def kind(self) -> str | None:
        return self.manifest.get("kind")

    def run(self) -> None:
        """Say which stage lost it: tokenizer/template, merge, conversion or quantisation."""
        foreign = foreign_reference(self.manifest, self.ref.folder)
        if foreign:  # no stage of this export can be blamed for differing from another model
            self.result.verdict = [foreign]
            return
        verdict = self._identity()
        merge_ok = self._merge(verdict)
        if self.kind in ("model", "run"):
            self._pytorch_conversion(verdict)
        else:
            float_rows = [r for r in self.result.rows if r.quant in FLOAT_TYPES] or self._fresh_float_rows(verdict)
            self._conversion(verdict, float_rows)
            self._quantisation(verdict, float_rows)
        if not verdict and merge_ok:
            verdict.append("undetermined: no single stage explains the failure; see the rows above")
        self.result.verdict = verdict

    def _identity(self) -> list[str]:
        failed = [r for r in self.result.rows if not r.passed]
        ident = sorted({c for r in failed for c in r.causes() if c in IDENTITY})
        if not ident:
            return []
        return [f"tokenizer/template: {', '.join(ident)} differ from the reference "
                f"({'; '.join(f for r in failed for f in r.failures if f.split(':')[0] in ident)[:300]}); "
                "re-export with the model folder's own tokenizer files and chat template"]

    def _merge(self, verdict: list[str]) -> bool:
        """The adapter model against the merged model (the run named by --adapter or the merged model's parent)."""
        row = self.result.merge
        ref_dir = self.ref.folder
        if row is None:
            parent = (read_manifest(ref_dir).get("parent") or {}) if (ref_dir / MANIFEST).is_file() else {}
            if parent.get("kind") == "run" and Path(parent.get("path", "")).is_dir():
                try:
                    row = merge_row(self.ref, Path(parent["path"]), self.result.reference_dtype)
                except MemoryShortError as e:  # the rows above stand; only this stage goes unchecked
                    verdict.append(f"merge: not checked ({e})")
                    return True
                self.result.localisation.append(row)
        if row is None or row.passed:
            return True
        verdict.append(f"merge: the merged model {ref_dir} already differs from the adapter model "
                       f"({'; '.join(row.failures)[:240]}); merge again with `edgemed merge RUN_DIR --out DIR`")
        return False

    def _pytorch_conversion(self, verdict: list[str]) -> None:
        """A PyTorch candidate: its weights against the reference's, naming the tensors that differ."""
        r = self.result.rows[0]
        if any(c in r.causes() for c in BEHAVIOUR):
            tensors = tensor_diff(self.ref.folder, self.export_dir) if self.kind == "model" else []
            what = f"; tensors that differ: {', '.join(tensors)}" if tensors else ""
            img = " (image path: vision tower or projector)" if "image" in r.causes() else ""
            verdict.append(f"conversion{img}: the weights differ from the reference ({r.why(BEHAVIOUR)}){what}")

    def _conversion(self, verdict: list[str], float_rows: list[Row]) -> None:
        for r in float_rows:
            if any(c in r.causes() for c in BEHAVIOUR):
                img = " (image path: vision tower or projector)" if "image" in r.causes() else ""
                verdict.append(f"conversion{img}: the float export {r.label} already differs from the merged model "
                               f"({r.why(BEHAVIOUR)}); the exporter mis-wrote a tensor or a setting")

    def _quantisation(self, verdict: list[str], float_rows: list[Row]) -> None:
        """Each failing quantised file against the float export, on the same tokens."""
        conv_ok = all(r.passed or not (set(r.causes()) - set(IDENTITY)) for r in float_rows)
        for label, q, _ in self.cands:
            row = next(r for r in self.result.rows if r.label == label)
            if q in FLOAT_TYPES or row.passed:
                continue
            pair = next((k for k, (_, other) in self.pairs.items() if other == label), None)
            if pair is not None:
                self.result.localisation.append(self.ref.row(pair, q, "pair", self.accs[pair], pair=True))
            if conv_ok and float_rows and set(row.causes()) & set(BEHAVIOUR):
                verdict.append(f"quantisation: {float_rows[0].label} matches the merged model but {label} does "
                               f"not ({row.why(BEHAVIOUR)})"
                               f"; use a larger quant (smallest passing: {self.result.smallest_passing or 'none'})")

    def _fresh_float_rows(self, verdict: list[str]) -> list[Row]:
        """A float export of the reference (GGUF f16, ONNX fp32) made by ``float_export`` beside the check and
        compared; [] with a verdict line when there is none to make or making it failed."""
        if self.kind not in ("gguf", "onnx"):
            return []
        if self.float_export is None:
            verdict.append("conversion: not separated from quantisation (no float export of the reference to "
                           "compare with; `edgemed parity` makes a fresh one)")
            return []
        tmp = Path(tempfile.mkdtemp(prefix="edgemed-parity-"))
        try:
            folder = Path(self.float_export(self.ref.folder, str(self.kind), tmp / "float"))
            found = [(q, kw) for _, q, kw in candidates(folder, read_manifest(folder)) if q in FLOAT_TYPES]
            if not found:
                raise ParityError(f"{folder} holds no float file to compare")
            quant, kw = found[0]
            row = self.ref.compare_folder(f"fresh {quant} export", quant, runtime_of(self.manifest), folder, kw)
            self.result.localisation.append(row)
            return [row]
        except (ImportError, EdgemedError) as e:
            verdict.append(f"conversion: not separated from quantisation (a fresh float export failed: {e})")
            return []
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def foreign_reference(manifest: dict[str, Any], ref_dir: Path) -> str | None:
    """Why ``ref_dir`` is not the model the export was made from (its manifest's parent, by sha256), or None."""
    parent = manifest.get("parent") or {}
    if manifest.get("kind") not in ("gguf", "onnx") or not parent.get("path"):
        return None
    want = parent.get("tree_sha256")
    same_path = Path(parent["path"]).resolve() == Path(ref_dir).resolve()
    if want is None and same_path:
        return None
    have = tree_sha256(ref_dir)
    if have == want:
        return None
    if same_path:
        return (f"reference: {ref_dir} changed since this export was made from it (sha256 {have[:12]}…, the export "
                f"records {str(want)[:12]}…); the failure says nothing about the exporter: export the model again")
    return (f"reference: {ref_dir} is not the model this export came from (its manifest names {parent['path']}"
            f"{f', sha256 {want[:12]}…' if want else ''}); the failure says nothing about the exporter: compare with "
            "that model (leave --reference out) or export this one")


def tensor_diff(a: Path, b: Path, limit: int = 5) -> list[str]:
    """Names of the tensors that differ between two safetensors model folders (for a PyTorch candidate)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "np") as h:
                out.update({k: f for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
        return out

    ta, tb = tensors(a), tensors(b)
    diff = sorted(set(ta) ^ set(tb))
    for k in sorted(set(ta) & set(tb)):
        with safe_open(ta[k], "pt") as ha, safe_open(tb[k], "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        if x.shape != y.shape or not bool((x.float() == y.float()).all()):
            diff.append(k)
    return diff[:limit] + ([f"... {len(diff) - limit} more"] if len(diff) > limit else [])

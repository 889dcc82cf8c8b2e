"""`edgemed export gguf RUN_DIR`: a fine-tune run -> the base model once (at the quants asked for) plus the run's
decoder LoRA as a llama.cpp LoRA adapter GGUF, and for image models an mmproj carrying the run's projector.

Merging and then rounding to 4 bits rounds a small fine-tune away; holding the 4-bit base and the f16 low-rank
change apart keeps it (llama.cpp computes ``W x + alpha/r * B (A x)`` per adapted tensor). The adapter file is
written by gguf-py's writer with llama.cpp's layout (``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, tensors ``<base tensor>.lora_a`` / ``.lora_b``). Tensor names come from the same plan
``export_gguf`` makes for the base (gguf-py's TensorNameMap), so an A/B pair lands on exactly the tensor its
module's weight became; for Llama-family q/k the B rows get the weight's rope permutation.

What llama.cpp cannot express is refused with the reason, never exported as if it worked: trained decoder norms
(llama.cpp's adapter loader skips ``*_norm.weight`` tensors; tests/test_export_gguf_adapter.py runs it), DoRA,
per-module alphas, non-LoRA adapter tensors, and targets whose weight is split or transformed on export.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed.archs import arch_for_dir
from edgemed.archs.base import ArchSpec
from edgemed.artifacts import MANIFEST, atomic_dir, read_manifest, sha256_file, tree_sha256, write_manifest
from edgemed.errors import ArtifactError, ExportError
from edgemed.export import gguf_tensors as gt
from edgemed.export import gguf_text as g
from edgemed.export.gguf_mmproj import warn_known_defects, write_mmproj_gguf
from edgemed.export.gguf_tensors import Checkpoint, Entry, plan_tensors
from edgemed.modeling import ADAPTER, TRAINED, refuse_bnb, run_base

ADAPTER_QUANTS = ("f16", "q8_0", "f32")
BASE_TREE_KEY = "edgemed.base_model.tree_sha256"  # the transformers checkpoint both base and adapter files come from


@dataclass
class LoraPart:
    """One LoRA pair: the module-tree weight name it adapts, and A [r, in], B [out, r] as float32 numpy."""

    weight: str
    a: Any
    b: Any


def read_run_lora(run_dir: Path) -> tuple[list[LoraPart], float, dict[str, Any]]:
    """The run's LoRA pairs and the alpha llama.cpp must be given (scale = alpha / rank per tensor)."""
    import numpy as np
    from safetensors.numpy import load_file

    adapter = run_dir / ADAPTER
    if not adapter.is_dir():
        return [], 0.0, {}
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise ExportError(f"{adapter}: is a DoRA adapter; llama.cpp applies plain LoRA only (W + s*B*A), so it cannot "
                          "carry DoRA's magnitude vector: run `edgemed merge` and export the merged model")
    if cfg.get("alpha_pattern"):
        raise ExportError(f"{adapter}: sets per-module alphas (alpha_pattern); a llama.cpp adapter file holds one "
                          "alpha: run `edgemed merge` and export the merged model")
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):  # PEFT scales by alpha/sqrt(r), llama.cpp by alpha/r: fold sqrt(r) into alpha
        if cfg.get("rank_pattern"):
            raise ExportError(f"{adapter}: rsLoRA with per-module ranks has no single llama.cpp alpha; merge it")
        alpha *= math.sqrt(cfg["r"])
    state = load_file(adapter / "adapter_model.safetensors")
    pairs: dict[str, list[Any]] = {}
    for k, v in state.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", k)
        if not m:
            raise ExportError(f"{adapter}: adapter tensor {k!r} is not a LoRA A/B weight (modules_to_save, biases?); "
                              "a llama.cpp adapter carries LoRA pairs only: run `edgemed merge` and export that")
        pairs.setdefault(m.group(1) + ".weight", [None, None])["AB".index(m.group(2))] = v.astype(np.float32)
    parts = []
    for w, (a, b) in sorted(pairs.items()):
        if a is None or b is None:
            raise ExportError(f"{adapter}: {w} has only one of lora_A/lora_B; the adapter is damaged")
        parts.append(LoraPart(w, a, b))
    return parts, alpha, cfg


class OverlayCheckpoint(Checkpoint):
    """The base checkpoint with the run's trained tensors and merged vision LoRA in place (for the mmproj).

    Small (projector and vision tower only), so merging here costs one tensor at a time, like ``edgemed merge``.
    """

    def __init__(self, base: Checkpoint, names: dict[str, str], trained: dict[str, Any],
                 lora: dict[str, LoraPart], alpha: float):
        self.__dict__.update(base.__dict__)
        self.names, self.trained, self.lora, self.alpha = names, trained, lora, alpha
        self.used: set[str] = set()

    def get(self, key: str):
        name = self.names.get(key, key)
        w = self.trained[name] if name in self.trained else super().get(key)
        if name in self.lora:
            p = self.lora[name]
            w = w + (self.alpha / p.a.shape[0]) * (p.b @ p.a)
        if name in self.trained or name in self.lora:
            self.used.add(name)
        return w


def export_gguf_run(run_dir: Path | str, quants: list[str], out: Path | str, *, overwrite: bool = False,
                    mmproj_quant: str = "f16", adapter_quant: str = "f16", compensate: int = 0,
                    calibration: Path | str | None = None, calibrate: bool = True,
                    calibration_samples: int | None = None, calibration_tokens: int | None = None) -> Path:
    """Write the run's base at ``quants``, its decoder LoRA as ``adapter-<quant>.gguf`` and (image models) the
    mmproj with the run's projector and vision LoRA merged in; the manifest binds them by sha256.

    Args:
        run_dir: an ``edgemed finetune`` run folder (kind "run").
        quants: base-model quants (as for ``export_gguf``).
        out: output folder; written under a temporary name and renamed when complete.
        overwrite: replace an existing ``out``.
        mmproj_quant: tensor type of the projector file.
        adapter_quant: tensor type of the adapter file: f16 (default), q8_0 or f32.
        compensate: rank k > 0 also writes, per llama.cpp quant of the base, ``adapter-<aq>-<quant>.gguf``: the
            run's LoRA plus a rank-k correction of that base's rounding error on every quantized decoder matrix
            (:mod:`edgemed.export.lowrank`), weighted by importance matrices of the run on its training data
            (or ``calibration``); the runtime uses it with that quant's base.
        calibration, calibrate, calibration_samples, calibration_tokens: the data for those matrices, as for a
            merged model's calibrated export (only read when ``compensate`` is set).

    Returns:
        The output folder.
    """
    run_dir = Path(run_dir).absolute()
    quants = g.check_quants(quants, mmproj_quant)
    if compensate < 0:
        raise ExportError(f"--compensate must be a rank of at least 1 (or 0 for none), got {compensate}")
    if compensate and not [q for q in quants if q in g.LLAMA_QUANTS]:
        raise ExportError(f"--compensate corrects llama.cpp's rounding, but none of {', '.join(quants)} is rounded "
                          "by llama.cpp; add a quant such as q4_0 or drop --compensate")
    if adapter_quant not in ADAPTER_QUANTS:
        raise ExportError(f"unknown adapter quant {adapter_quant!r}; choose one of {', '.join(ADAPTER_QUANTS)}")
    manifest = read_manifest(run_dir, ("run",))
    if not isinstance(manifest.get("base_model"), dict) or not manifest["base_model"].get("path"):
        raise ArtifactError(f"{run_dir}: its run manifest names no base model; the run folder is damaged, fine-tune "
                            "again (or `edgemed merge` it if the merge still works and export the merged model)")
    base = run_base(run_dir, manifest)
    refuse_bnb(base, "GGUF export")
    spec = arch_for_dir(base)
    if spec.gguf_arch is None or spec.gguf is None:
        why = spec.no_gguf_reason or f"llama.cpp has no support for {spec.family}"
        raise ExportError(f"{run_dir}: {why}; use `edgemed export onnx` on the merged model instead")
    config = g.load_config(base)
    ckpt = Checkpoint(base)
    text_plan = plan_tensors(spec, config, ckpt, "text")
    lora, alpha, lora_cfg = read_run_lora(run_dir)
    trained = _read_trained(run_dir)
    from edgemed.merge import checkpoint_to_module_names

    names = checkpoint_to_module_names(base, ckpt.keys)  # checkpoint key -> module-tree name
    dec_lora, vis_lora = _split_lora(spec, lora, run_dir)
    _refuse_text_trained(spec, trained, run_dir)
    if not dec_lora:
        raise ExportError(f"{run_dir}: trained no decoder LoRA, so there is no llama.cpp adapter to write; run "
                          f"`edgemed merge {run_dir} --out MODEL_DIR` and `edgemed export gguf MODEL_DIR`")
    adapter_tensors = plan_adapter(spec, config, text_plan, names, dec_lora, run_dir)
    base_prov = g.source_provenance(base, _model_manifest(base))
    base_prov["base_model_sha256"] = base_prov["tree_sha256"]
    run_prov = {**base_prov, "name": str(manifest.get("name") or run_dir.name), "tree_sha256": tree_sha256(run_dir),
                "manifest": {"sha256": sha256_file(run_dir / MANIFEST), "kind": "run"}}

    calib = None
    if compensate:  # read and checked before anything is written (a bad file leaves no output)
        from edgemed.export import imatrix

        calib = imatrix.calibration_plan(run_dir, calibration, calibrate, calibration_samples, used=True)
    if spec.is_vision:  # before anything is written (a CLIP LLaVA)
        warn_known_defects(spec, plan_tensors(spec, config, ckpt, "vision"), run_dir)
    files: dict[str, str] = {}
    compensated: dict[str, str] = {}
    cal = None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        src = _write_base(spec, config, base, ckpt, text_plan, quants, tmp, base_prov, files)
        adapter_file = f"adapter-{adapter_quant}.gguf"
        write_adapter_gguf(spec, adapter_tensors, alpha, adapter_quant, tmp / adapter_file, run_prov)
        if compensate:
            cal = _run_imatrix(run_dir, calib, ckpt, text_plan, calibration_tokens) if calib is not None else None
            for q in [q for q in quants if q in g.LLAMA_QUANTS]:
                compensated[q] = f"adapter-{adapter_quant}-{q}.gguf"
                _write_compensated(spec, adapter_tensors, alpha, src, tmp / files[q], cal, compensate,
                                   adapter_quant, tmp / compensated[q], run_prov)
        if src is not None and src.name.startswith("."):
            src.unlink()
        mmproj = None
        if spec.is_vision:
            vis_trained = {k: v for k, v in trained.items() if spec.part_of(k) in ("vision", "projector")}
            overlay = OverlayCheckpoint(ckpt, names, vis_trained, {p.weight: p for p in vis_lora}, alpha)
            vision_plan = plan_tensors(spec, config, overlay, "vision")
            mmproj = f"mmproj-{mmproj_quant}.gguf"
            write_mmproj_gguf(spec, config, base, overlay, vision_plan, mmproj_quant, tmp / mmproj, run_prov)
            unused = (set(vis_trained) | {p.weight for p in vis_lora}) - overlay.used
            if unused:
                raise ExportError(f"{run_dir}: trained tensors {sorted(unused)[:3]} did not reach the mmproj file "
                                  "(llama.cpp's projector skips them); merge the run and export the merged model")
        for name in g.TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        binding = {"base": {q: sha256_file(tmp / f) for q, f in files.items()},
                   "adapter": sha256_file(tmp / adapter_file),
                   **({"compensated": {q: sha256_file(tmp / f) for q, f in compensated.items()}}
                      if compensated else {}),
                   "mmproj": sha256_file(tmp / mmproj) if mmproj else None,
                   "base_tree_sha256": base_prov["tree_sha256"]}
        write_manifest(tmp, "gguf", arch=spec.name, gguf_arch=spec.gguf_arch, quants=quants, models=files,
                       adapters={"default": adapter_file},
                       adapter={"quant": adapter_quant, "alpha": alpha, "r": lora_cfg.get("r"),
                                "tensors": len(adapter_tensors) // 2, "vision_lora_merged": len(vis_lora)},
                       compensated=compensated or None,
                       compensation={"rank": compensate, "method": "LQER: activation-weighted rank-k SVD of each "
                                     "quantized decoder matrix's rounding error, stacked onto the LoRA pairs",
                                     "calibration": cal.provenance(None) if cal is not None else None}
                       if compensated else None,
                       binding=binding, mmproj=mmproj, mmproj_quant=mmproj_quant if mmproj else None,
                       image_placeholder=spec.image_placeholder, image_token_id=g.image_placeholder_id(base, spec),
                       name=run_prov["name"], base_model=base_prov["name"],
                       base_model_sha256=base_prov["tree_sha256"],
                       parent={"kind": "run", "path": str(run_dir), "tree_sha256": run_prov["tree_sha256"],
                               "manifest": run_prov["manifest"]})
    return Path(out)


def _model_manifest(base: Path) -> dict[str, Any] | None:
    try:
        m = read_manifest(base)
    except Exception:  # a plain transformers folder (no or foreign manifest): provenance from the folder itself
        return None
    return m if m.get("kind") == "model" else None


def _read_trained(run_dir: Path) -> dict[str, Any]:
    import numpy as np
    from safetensors.numpy import load_file

    path = run_dir / TRAINED
    return {k: v.astype(np.float32) for k, v in load_file(path).items()} if path.is_file() else {}


def _split_lora(spec: ArchSpec, lora: list[LoraPart], run_dir: Path) -> tuple[list[LoraPart], list[LoraPart]]:
    dec, vis = [], []
    for p in lora:
        part = spec.part_of(p.weight)
        if part in ("decoder", "lm_head"):
            dec.append(p)
        elif part in ("vision", "projector"):
            vis.append(p)
        else:
            raise ExportError(f"{run_dir}: LoRA on {p.weight!r} ({part}) has no place in a llama.cpp export")
    return dec, vis


def _refuse_text_trained(spec: ArchSpec, trained: dict[str, Any], run_dir: Path) -> None:
    text = sorted(k for k in trained if spec.part_of(k) not in ("vision", "projector"))
    if text:
        raise ExportError(
            f"{run_dir}: trained text-model tensors ({text[0]!r} and {len(text) - 1} more, e.g. LayerNorm-only "
            "tuning); llama.cpp's adapter loader skips norm tensors, so an adapter file cannot carry them: run "
            f"`edgemed merge {run_dir} --out MODEL_DIR` and `edgemed export gguf MODEL_DIR` (a merged export)")


def plan_adapter(spec: ArchSpec, config: Any, text_plan: list[Entry], names: dict[str, str],
                 lora: list[LoraPart], run_dir: Path) -> list[tuple[str, Any]]:
    """``(gguf name, array)`` for every lora_a / lora_b tensor, named after the base tensor each pair adapts."""
    spec_g = spec.gguf
    assert spec_g is not None
    by_module: dict[str, list[Entry]] = {}
    for e in text_plan:
        by_module.setdefault(names.get(e.key, e.key), []).append(e)
    text_cfg = spec.text_config(config)
    n_head = text_cfg.num_attention_heads
    n_kv = getattr(text_cfg, "num_key_value_heads", None) or n_head
    out: list[tuple[str, Any]] = []
    for p in lora:
        entries = by_module.get(p.weight, [])
        if len(entries) != 1:
            why = "is not in the base's text model" if not entries else f"is split into {len(entries)} GGUF tensors"
            raise ExportError(f"{run_dir}: LoRA target {p.weight!r} {why}; llama.cpp cannot apply this adapter: "
                              "merge the run and export the merged model")
        e = entries[0]
        b = p.b
        if spec_g.permute_qk and re.fullmatch(r"blk\.\d+\.attn_q\.weight", e.name):
            b = gt.permute(n_head)(b)  # B's rows are the weight's output rows: same rope permutation
        elif spec_g.permute_qk and re.fullmatch(r"blk\.\d+\.attn_k\.weight", e.name):
            b = gt.permute(n_kv)(b)
        elif e.transform is not None:
            raise ExportError(f"{run_dir}: the base weight of LoRA target {p.weight!r} is transformed on export "
                              f"({e.name}); the low-rank change cannot follow it: merge the run and export that")
        if p.a.shape[1] != e.shape[1] or b.shape[0] != e.shape[0]:
            raise ExportError(f"{run_dir}: LoRA {p.weight!r} has A {p.a.shape}, B {b.shape} but the weight is "
                              f"{e.shape}; the run was trained on another base")
        out += [(f"{e.name}.lora_a", p.a), (f"{e.name}.lora_b", b)]
    return out


def _write_base(spec: ArchSpec, config: Any, base: Path, ckpt: Checkpoint, plan: list[Entry], quants: list[str],
                tmp: Path, prov: dict[str, Any], files: dict[str, str]) -> Path | None:
    """The base text model at each quant, as export_gguf writes them (llama.cpp quants from one f16 file).

    Returns the f16 file llama.cpp's quants were made from (a hidden intermediate, removed by the caller, where
    f16 was not asked for), or None when there are no llama.cpp quants."""
    for q in quants:
        if q in g.DIRECT:
            g.write_text_gguf(spec, config, base, ckpt, plan, q, tmp / f"model-{q}.gguf", prov)
            files[q] = f"model-{q}.gguf"
    llama = [q for q in quants if q in g.LLAMA_QUANTS]
    if llama:
        src = tmp / ("model-f16.gguf" if "f16" in files else ".intermediate-f16.gguf")
        if "f16" not in files:
            g.write_text_gguf(spec, config, base, ckpt, plan, "f16", src, prov)
        for q in llama:
            g.llama_quantize(src, tmp / f"model-{q}.gguf", q)
            files[q] = f"model-{q}.gguf"
        return src
    return None


def _run_imatrix(run_dir: Path, calib: Any, ckpt: Checkpoint, plan: list[Entry], max_tokens: int | None) -> Any:
    """Importance matrices of the run itself (base + LoRA, unmerged) over its calibration records."""
    from edgemed.export import imatrix

    records, data_path, data_sha = calib
    return imatrix.compute_imatrix(run_dir, records, data_path, data_sha, ckpt, plan,
                                   max_tokens=max_tokens or imatrix.MAX_TOKENS,
                                   system=imatrix.run_system_prompt(run_dir))


def _write_compensated(spec: ArchSpec, adapter_tensors: list[tuple[str, Any]], alpha: float, src: Path,
                       quantized: Path, cal: Any, rank: int, adapter_quant: str, path: Path,
                       prov: dict[str, Any]) -> None:
    """The run's LoRA pairs with each quantized matrix's rank-``rank`` correction stacked in
    (edgemed.export.lowrank)."""
    from edgemed.export import lowrank

    pairs = {name[: -len(".lora_a")]: [arr, None] for name, arr in adapter_tensors if name.endswith(".lora_a")}
    for name, arr in adapter_tensors:
        if name.endswith(".lora_b"):
            pairs[name[: -len(".lora_b")]][1] = arr
    corr = lowrank.corrections(src, quantized, cal.matrices if cal is not None else None, rank)
    tensors: list[tuple[str, Any]] = []
    for name in sorted(set(pairs) | set(corr)):
        lora = (pairs[name][0], pairs[name][1], alpha / pairs[name][0].shape[0]) if name in pairs else None
        a, b = lowrank.stack(lora, corr.get(name))
        tensors += [(f"{name}.lora_a", a), (f"{name}.lora_b", b)]
    write_adapter_gguf(spec, tensors, lowrank.FILE_ALPHA, adapter_quant, path, prov)


def write_adapter_gguf(spec: ArchSpec, tensors: list[tuple[str, Any]], alpha: float, quant: str, path: Path,
                       prov: dict[str, Any]) -> Path:
    """The llama.cpp LoRA adapter file (the layout llama.cpp's convert_lora_to_gguf writes), via gguf-py."""
    import gguf
    import numpy as np

    from edgemed.artifacts import atomic_file

    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, spec.gguf_arch)
        try:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
            w.add_name(prov["name"])
            w.add_string(BASE_TREE_KEY, prov["base_model_sha256"])
            w.add_string("edgemed.source.tree_sha256", prov["tree_sha256"])
            w.add_file_type(gt.file_type(quant))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for name, arr in tensors:
                t = gt.tensor_type(name, arr.shape, quant)
                data = gt.convert(np.asarray(arr, dtype=np.float32), t)
                w.add_tensor(name, data, raw_dtype=t)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return path

"""ONNX int4 with llama.cpp's per-tensor choice of bits (``export onnx --quant int4 --mixed q4_k_m``).

llama.cpp's "q4_k_m" is not 4 bits everywhere: its policy gives attn_v / ffn_down of some layers and the output
6 bits, and where a matrix's row width is not a multiple of 256 (Gemma 3 270M's 640, SmolLM2's 576) a k-quant falls
back to q5_0 / q8_0, so most of those models' matrices are stored at 5.5 bits and more. Rather than re-derive that
policy (it changes between llama.cpp releases), the export runs llama.cpp's own quantizer on the same model and
reads back each tensor's type: a matrix llama.cpp stores with 4-bit levels (at most 5 bits a weight, block scales
included: q4_0, q4_1, q4_k, iq4_*, and anything lower) stays int4, one it stores with more goes to 8-bit
``MatMulNBits`` in Q8_0 blocks, as the LM head already is.

ONNX weights are matched to GGUF tensors by value (as :class:`edgemed.export.imatrix.WeightImportance` matches
them to layers): a weight the genai builder packs (q, k, v; gate, up) gets 8 bits when any of its parts has more
than 4-bit levels in llama.cpp's file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgemed.archs import arch_for_dir
from edgemed.artifacts import source_manifest
from edgemed.errors import ExportError
from edgemed.export.imatrix import weight_fingerprint

MIXES = ("q4_k_m", "q5_k_m", "q3_k_m", "q4_0")  # llama.cpp policies that need no importance matrix to choose types
MAX_INT4_BPW = 5.0  # bits per weight of q4_1, the largest 4-bit-level type; q5_0 is 5.5


def check_mix(quant: str, mixed: str | None) -> None:
    """A clear error for a ``--mixed`` value that is not a policy, or one given with another quant than int4."""
    if mixed is None:
        return
    if mixed not in MIXES:
        raise ExportError(f"unknown llama.cpp policy {mixed!r} for --mixed; choose one of {', '.join(MIXES)}")
    if quant != "int4":
        raise ExportError(f"--mixed {mixed} applies to --quant int4 only (got --quant {quant}); drop --mixed or "
                          "use --quant int4")


def bits_per_weight(type_name: str) -> float:
    """Storage bits per weight of a GGML type, block scales included (gguf-py's block sizes)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return nbytes * 8 / block


class LlamaMix:
    """llama.cpp's tensor types for a model and its matrices' fingerprints: call it with an ONNX MatMul weight
    (initializer name, W [K, N]) for the bits that weight gets (4 or 8). Every call is recorded in :attr:`rows`."""

    def __init__(self, policy: str, types: dict[str, str], prints: dict[bytes, list[tuple[str, int, Any]]]):
        self.policy, self.types, self._prints = policy, types, prints
        self.rows: list[dict[str, Any]] = []

    def parts(self, w: np.ndarray) -> list[str] | None:
        """GGUF names of the matrices ``w`` holds side by side along N (one, or a pack), or None if not all match."""
        names, c = [], 0
        while c < w.shape[1]:
            col = np.ascontiguousarray(w[:, c], np.float32).tobytes()
            hit = next(((name, rows) for name, rows, fp in self._prints.get(col, [])
                        if c + rows <= w.shape[1] and weight_fingerprint(w[:, c:c + rows].T) == fp), None)
            if hit is None:
                return None
            names.append(hit[0])
            c += hit[1]
        return names

    def __call__(self, name: str, w: np.ndarray, node: str) -> int:
        parts = self.parts(w)
        if parts is None:
            raise ExportError(f"ONNX weight {name} (node {node}, {w.shape[0]}x{w.shape[1]}) matches no tensor of "
                              f"llama.cpp's {self.policy} file, so its bits cannot follow llama.cpp; export without "
                              "--mixed")
        types = [self.types[p] for p in parts]
        bits = 8 if max(bits_per_weight(t) for t in types) > MAX_INT4_BPW else 4
        self.rows.append({"weight": name, "node": node, "gguf": parts, "llama_types": types, "bits": bits})
        return bits

    def summary(self) -> dict[str, Any]:
        """The manifest's record: the policy, counts, and per ONNX weight its GGUF tensors, their types and bits."""
        return {"policy": self.policy, "int8": sum(r["bits"] == 8 for r in self.rows),
                "int4": sum(r["bits"] == 4 for r in self.rows), "tensors": self.rows}


def llama_mix(model_dir: Path, policy: str, work: Path | None = None) -> LlamaMix:
    """Write ``model_dir``'s text model as f16 GGUF, quantize it with llama.cpp's quantizer at ``policy`` and read
    back each tensor's type (the two files are removed). Fails for an architecture llama.cpp cannot load."""
    from gguf import GGMLQuantizationType

    from edgemed.export.gguf_tensors import Checkpoint, plan_tensors
    from edgemed.export.gguf_text import llama_quantize, load_config, source_provenance, write_text_gguf
    from edgemed.gguf_header import read_header

    spec = arch_for_dir(model_dir)
    if spec.gguf_arch is None or spec.gguf is None:
        why = spec.no_gguf_reason or f"llama.cpp has no support for {spec.family}"
        raise ExportError(f"{model_dir}: --mixed {policy} reads llama.cpp's tensor types, but {why}; export "
                          "without --mixed")
    config = load_config(model_dir)
    ckpt = Checkpoint(model_dir)
    plan = plan_tensors(spec, config, ckpt, "text")
    with tempfile.TemporaryDirectory(prefix=".mix-", dir=work) as tmp:
        f16, quantized = Path(tmp) / "f16.gguf", Path(tmp) / f"{policy}.gguf"
        write_text_gguf(spec, config, model_dir, ckpt, plan, "f16", f16,
                        source_provenance(model_dir, source_manifest(model_dir)))
        llama_quantize(f16, quantized, policy)
        types = {t.name: GGMLQuantizationType(t.ggml_type).name for t in read_header(quantized).tensors}
    prints: dict[bytes, list[tuple[str, int, Any]]] = {}
    for e in plan:
        if e.key and len(e.shape) == 2 and e.name in types and e.make is None:
            w = np.asarray(ckpt.get(e.key), np.float32)  # [out, in]: HF's values (before the GGUF transforms)
            first_row = np.ascontiguousarray(w[0]).tobytes()
            prints.setdefault(first_row, []).append((e.name, w.shape[0], weight_fingerprint(w)))
    return LlamaMix(policy, types, prints)

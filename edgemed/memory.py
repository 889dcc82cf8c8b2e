"""Memory a command will need, checked before it starts: a workstation that is short gets a refusal that says how
much is needed and how much there is, never an out-of-memory kill halfway through a merge or an export.

The needs are peak resident memory *above the interpreter that has imported torch and transformers* (the process
already holds that when a command starts), from the checkpoint's files and config alone. Each rule is the shape
the code's own memory takes, with constants measured on this code (the figures, and the commands that gave them,
are in docs/scale.md, "Memory before work"):

* merge: shards are streamed tensor by tensor and the logit check reads one decoder layer at a time, so the peak is
  the largest shard plus 10% and 200 MB (tools/bench_merge.py measured 762 MB at 0.66B for a bound of 827 MB).
* export gguf: tensors are converted one at a time and llama.cpp's quantizer maps its input, so twice the largest
  tensor in fp32 plus 150 MB (SmolLM2-135M to q4_k_m: 172 MB above the baseline; its largest tensor is 113 MB
  in fp32). Computing importance matrices loads the whole model in fp32 for its forward passes: that instead.
* export onnx: torch.onnx holds the fp32 model and the graph it builds with its initializers: 2.3x the fp32
  weights plus 200 MB (SmolLM2-135M: 1.04 GB fp32 and 1.23 GB int4 above the baseline, for 0.54 GB of weights).
  An image model's token table is exported twice (embed.onnx, and the decoder's head when tied), so its largest
  tensor counts twice (one-layer MedGemma 4B: 11.87 GB measured, 13.63 GB predicted; 7.46 GB without it).
* parity: the reference in fp32, every export file it opens (llama.cpp and onnxruntime map them), a quarter of
  the reference for activations and logits, plus 300 MB (SmolLM2-135M against its q4_k_m: 0.99 GB measured,
  1.08 GB predicted).
* answering from a PyTorch folder (`ask`, `serve`, `eval` on a model or run folder, on the CPU): the weights at
  the load dtype (fp32 by default) plus a quarter for activations and logits and 300 MB; the parity rule's
  reference term, which is the same load.
* finetune: `edgemed plan`'s own sum (weights, LoRA with AdamW, activations, logits) for the device it runs on,
  plus 300 MB (``edgemed.train`` asks; this module imports nothing of edgemed's but its errors).

``EDGEMED_NO_MEMORY_CHECK=1`` skips the checks, for a machine whose swap or page cache the estimate cannot see.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from edgemed.errors import EdgemedError

GB = 1e9
MB = 1e6
SKIP_ENV = "EDGEMED_NO_MEMORY_CHECK"


class MemoryShortError(EdgemedError):
    """The machine has less memory available than a command needs."""


def available_bytes() -> int | None:
    """Memory this process may still take: MemAvailable, capped by a cgroup (container) limit; None if unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_room()
    if limit is not None:
        avail = limit if avail is None else min(avail, limit)
    return avail


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 memory limit (memory.max - memory.current), or None when there is no limit."""
    root = Path("/sys/fs/cgroup")
    try:
        raw = (root / "memory.max").read_text().strip()
        if raw == "max":
            return None
        return max(0, int(raw) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def fits(need: float, available: int | None = None) -> bool:
    """Whether ``need`` bytes fit in what is available (always, with the check skipped or availability unknown)."""
    if os.environ.get(SKIP_ENV) == "1":
        return True
    have = available_bytes() if available is None else available
    return have is None or need <= have


def require(need: float, what: str, available: int | None = None) -> None:
    """Refuse ``what`` (a sentence naming the command and its input) when ``need`` bytes exceed what is available."""
    if fits(need, available):
        return
    have = available_bytes() if available is None else available
    raise MemoryShortError(
        f"{what} needs about {need / GB:.1f} GB of memory and this machine has {have / GB:.1f} GB available; "
        "nothing was started. Close other programs or run it on a machine with more memory (`edgemed plan "
        f"RECIPE` shows what each step needs); set {SKIP_ENV}=1 to try anyway")


# ---------------------------------------------------------------- what a checkpoint holds, from its headers


def _safetensors(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def tensor_sizes(folder: Path) -> tuple[int, int]:
    """(number of values in all tensors, in the largest one) of a safetensors checkpoint, from the file headers."""
    total = largest = 0
    for f in _safetensors(folder):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(n, 100_000_000)))
            shapes = [v["shape"] for k, v in header.items() if k != "__metadata__"]
            numels = [math.prod(int(d) for d in shape) for shape in shapes]
        except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError):
            continue  # a damaged file counts as empty here: the loader that reads it says what is wrong with it
        total += sum(numels)
        largest = max([largest, *numels])
    return total, largest


def largest_shard(folder: Path) -> int:
    return max((f.stat().st_size for f in _safetensors(folder)), default=0)


# ---------------------------------------------------------------- needs, in bytes above the interpreter
# each from numbers (values in all tensors and in the largest, bytes of the largest shard), so that `edgemed plan`
# can predict them from a config alone, and from a folder's headers


def merge_bytes(largest_shard_bytes: float) -> float:
    return 1.1 * largest_shard_bytes + 200 * MB


def gguf_bytes(total: int, largest: int, calibrating: bool = False) -> float:
    need = 2 * 4 * largest + 150 * MB
    return max(need, 4 * total + 300 * MB) if calibrating else need


def onnx_bytes(total: int, largest: int = 0, image_model: bool = False) -> float:
    return 2.3 * 4 * (total + (largest if image_model else 0)) + 200 * MB


def pytorch_bytes(total: int, dtype_bytes: int = 4) -> float:
    return 1.25 * dtype_bytes * total + 300 * MB


def parity_bytes(total: int, export_bytes: float, dtype_bytes: int = 4) -> float:
    return pytorch_bytes(total, dtype_bytes) + export_bytes


def merge_need(base: Path) -> float:
    return merge_bytes(largest_shard(base))


def gguf_need(model: Path, calibrating: bool = False) -> float:
    return gguf_bytes(*tensor_sizes(model), calibrating=calibrating)


def onnx_need(model: Path) -> float:
    return onnx_bytes(*tensor_sizes(model), image_model=is_image_model(model))


def is_image_model(folder: Path) -> bool:
    """A checkpoint with a vision tower, from its config.json (``vision_config``); False when unreadable."""
    try:
        return "vision_config" in json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def pytorch_need(weights: Path, dtype: str = "float32") -> float:
    """Opening the checkpoint in ``weights`` in PyTorch at ``dtype`` (float32, bfloat16 or float16)."""
    return pytorch_bytes(tensor_sizes(weights)[0], 4 if dtype == "float32" else 2)


def parity_need(reference: Path, export_files: list[Path], dtype: str = "float32") -> float:
    """Parity against ``reference`` loaded at ``dtype`` (float32, bfloat16 or float16), with the export files."""
    return parity_bytes(tensor_sizes(reference)[0], sum(f.stat().st_size for f in export_files if f.is_file()),
                        4 if dtype == "float32" else 2)


def sixteen_bit_dtype(folder: Path) -> str:
    """The checkpoint's own 16-bit type from its config.json (``dtype`` / ``torch_dtype``: float16 for LLaVA-1.5),
    bfloat16 when it names none or a 32-bit one."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "bfloat16"
    named = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return "float16" if named == "float16" else "bfloat16"

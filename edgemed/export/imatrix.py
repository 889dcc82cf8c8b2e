"""Importance matrices for calibrated quantization, computed in PyTorch from the model being exported.

For every weight matrix the matrix is the mean square of its input activations per input channel, as
``llama-imatrix`` defines it (sum of x^2 over every token that reached the layer, divided by their count). They
are collected with forward hooks on the model's ``nn.Linear`` layers while it reads calibration prompts through
the reference backend, with their images: the decoder sees image tokens as in deployment, and the vision tower and
projector get their own matrices from the same images. Hand-written rather than run through ``llama-imatrix``
because llama-cpp-python ships no imatrix tool, and because this way the statistics come from the PyTorch model
itself, the reference every export is judged against.

The default calibration set of a fine-tuned model is its run's training data (the run manifest names it); a
plain checkpoint is exported uncalibrated unless a file is given. ``--calibration`` also takes an ``imatrix.gguf``
(an earlier edgemed export's, or ``llama-imatrix``'s GGUF output): its matrices are used as they are, with no model
run, after a check that they fit the model's tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemed.artifacts import atomic_file
from edgemed.errors import DataError, EdgemedError, ExportError

MAX_SAMPLES = 128  # calibration records read (llama.cpp's guidance: a few hundred chunks; these are short)
MAX_TOKENS = 512  # tokens per record
IMATRIX_FILE = "imatrix.gguf"

log = logging.getLogger(__name__)


class CalibrationError(DataError):
    """The calibration data cannot be used (missing, unreadable, empty or malformed)."""


@dataclass
class Calibration:
    """Importance matrices and where they came from."""

    source: str
    data_sha256: str
    samples: int
    tokens: int
    images: int
    matrices: dict[str, Any] = field(default_factory=dict)  # GGUF tensor name -> float32 mean square per column
    counts: dict[str, int] = field(default_factory=dict)  # GGUF tensor name -> activation rows seen
    matrices_file: str | None = None  # the imatrix file the matrices were read from (None: computed here)

    @property
    def sha256(self) -> str:
        """One hash over every matrix (name, length and float32 bytes), for the manifest."""
        import numpy as np

        h = hashlib.sha256(b"edgemed-imatrix-v1\n")
        for name in sorted(self.matrices):
            m = np.ascontiguousarray(self.matrices[name], dtype=np.float32)
            h.update(f"{name}\0{m.size}\n".encode())
            h.update(m.tobytes())
        return h.hexdigest()

    def provenance(self, file: str | None = IMATRIX_FILE) -> dict[str, Any]:
        """The manifest's ``calibration`` entry; ``file`` names the matrices' file in the folder (None: none)."""
        return {"data": self.source, "data_sha256": self.data_sha256, "samples": self.samples, "tokens": self.tokens,
                "images": self.images, "matrices": len(self.matrices), "imatrix_sha256": self.sha256,
                **({"file": file} if file else {}),
                **({"read_from": self.matrices_file} if self.matrices_file else {})}


# ---------------------------------------------------------------- which data
def default_calibration(model_dir: Path) -> Path | None:
    """The training data of the run a merged model came from (its first stage with a readable file), or None."""
    run = _run_behind_model(model_dir)
    for info in ((run.data or {}) if run is not None else {}).values():
        train = (info or {}).get("train")
        if train and Path(train).is_file():
            return Path(train)
    return None


def run_system_prompt(model_dir: Path) -> str | None:
    """The recipe's system prompt of the run behind a merged model (calibration renders prompts as training did)."""
    run = _run_behind_model(model_dir)
    return ((run.recipe or {}).get("prompt") or {}).get("system") if run is not None else None


def _run_behind_model(model_dir: Path) -> Any:
    """The run a merged model folder was made from (edgemed.manifest's lineage walk), the run itself for a run
    folder (an adapter export's corrections), or None."""
    from edgemed.manifest import find, run_of

    try:
        m = find(model_dir)
        return run_of(m) if m is not None and m.kind in ("model", "run") else None
    except EdgemedError:
        return None


def read_calibration(path: Path | str, max_samples: int = MAX_SAMPLES) -> tuple[list[Any], str]:
    """Records of a calibration file in any training-data format (text or VQA JSONL, VQA-RAD, SLAKE), spread over
    the file, and the data set's sha256.

    Raises:
        CalibrationError: the file is missing, malformed or empty (one line naming the file and the problem).
    """
    import numpy as np

    from edgemed.data import dataset_sha256, read_dataset

    path = Path(path)
    try:
        records = read_dataset(path)
        sha = dataset_sha256(path)
    except DataError as e:
        raise CalibrationError(f"calibration file unusable: {e}") from None
    if not records:
        raise CalibrationError(f"calibration file {path} holds no records; give a text or VQA JSONL file with some")
    if max_samples < 1:
        raise CalibrationError(f"--calibration-samples must be at least 1, got {max_samples}")
    if len(records) > max_samples:  # spread over the file: data files often group records by image or topic
        idx = np.linspace(0, len(records) - 1, max_samples).round().astype(int)
        records = [records[i] for i in dict.fromkeys(idx.tolist())]
    return records, sha


def is_imatrix_file(path: Path | str) -> bool:
    """Whether ``path`` is a GGUF file (by its magic), i.e. meant as an importance-matrix file, not data."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def read_imatrix(path: Path | str) -> Calibration:
    """Importance matrices from a GGUF imatrix file (``<name>.in_sum2`` / ``<name>.counts``, llama.cpp's layout,
    which :func:`write_imatrix` writes too). An edgemed file keeps its calibration data's provenance; a
    ``llama-imatrix`` file is described by its own hash and chunk count.

    Raises:
        CalibrationError: unreadable, not an imatrix, or a tensor pair missing or malformed.
    """
    import gguf
    import numpy as np

    from edgemed.artifacts import sha256_file

    path = Path(path)
    hint = "give a text or VQA JSONL data file, or the imatrix.gguf of an earlier `edgemed export gguf`"
    try:
        r = gguf.GGUFReader(path)
        kind = r.get_field(gguf.Keys.General.TYPE)
        kind = kind.contents() if kind is not None else None
        tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in r.tensors}
        extra = r.get_field("edgemed.calibration")
        meta = json.loads(extra.contents()) if extra is not None else None
        chunks = r.get_field("imatrix.chunk_count")
        chunks = int(chunks.contents()) if chunks is not None else 0
    except (ValueError, KeyError, IndexError, OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"calibration file {path} is not a readable GGUF file ({e}); {hint}") from None
    if kind != "imatrix":
        raise CalibrationError(f"calibration file {path} is a GGUF file of type {kind!r}, not an importance matrix; "
                               f"{hint}")
    matrices, counts = {}, {}
    for name in sorted(n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2")):
        n = tensors.get(f"{name}.counts")
        if n is None or n.size != 1 or not n[0] > 0:
            raise CalibrationError(f"calibration file {path}: {name} has "
                                   + ("no counts" if n is None else f"counts {n.tolist()[:4]}")
                                   + " (one positive count per matrix expected; per-expert matrices are not "
                                   f"supported); {hint}")
        m = tensors[f"{name}.in_sum2"] / n[0]
        if not np.isfinite(m).all() or (m < 0).any():
            raise CalibrationError(f"calibration file {path}: {name} holds negative or non-finite values; {hint}")
        matrices[name], counts[name] = m.astype(np.float32), int(n[0])
    if not matrices:
        raise CalibrationError(f"calibration file {path} holds no importance matrices; {hint}")
    m = meta or {}
    return Calibration(source=str(m.get("data") or path), data_sha256=str(m.get("data_sha256") or sha256_file(path)),
                       samples=int(m.get("samples") or chunks), tokens=int(m.get("tokens") or 0),
                       images=int(m.get("images") or 0), matrices=matrices, counts=counts,
                       matrices_file=str(path.absolute()))


def check_matrices(cal: Calibration, entries: list[Any], where: Path) -> None:
    """Refuse matrices read from a file that do not fit the model's GGUF tensors (``entries``): none of their
    names is a tensor of it, or a length differs from the tensor's input width. Before anything is written."""
    widths = {e.name: int(e.shape[-1]) for e in entries if len(e.shape) == 2}
    known = [n for n in cal.matrices if n in widths]
    if not known:
        raise CalibrationError(f"{cal.matrices_file}: none of its {len(cal.matrices)} importance matrices names a "
                               f"tensor of {where} (e.g. {next(iter(cal.matrices))}); it was made for another model")
    bad = next((n for n in known if cal.matrices[n].shape != (widths[n],)), None)
    if bad is not None:
        raise CalibrationError(f"{cal.matrices_file}: the matrix of {bad} has {cal.matrices[bad].size} columns, the "
                               f"tensor {widths[bad]} in {where}; it was made for another model")


def calibration_plan(model_dir: Path, calibration: Path | str | None, calibrate: bool, max_samples: int | None,
                     used: bool, unused: str = "", matrices_ok: bool = False
                     ) -> tuple[list[Any], Path, str] | Calibration | None:
    """(records, file, sha256) of the calibration data an export will use, read and checked before anything is
    written (a bad file leaves no output); None for an uncalibrated export. With ``matrices_ok`` a given GGUF
    imatrix file is read instead (:func:`read_imatrix`) and returned as its :class:`Calibration`.

    Args:
        model_dir: the model folder being exported (a merged fine-tune's default is its run's training data).
        calibration: the file given (``--calibration``), or None for the default.
        calibrate: False exports uncalibrated (``--no-calibration``); contradicts a given file.
        max_samples: cap on the records read (default :data:`MAX_SAMPLES`).
        used: whether any requested output uses the matrices; a given file is still checked when not.
        unused: why not, for the log line.
        matrices_ok: whether the caller takes ready matrices (GGUF export of a merged model); elsewhere an imatrix
            file is refused, since ONNX and adapter exports match matrices to layers, not to GGUF names.
    """
    if calibration is not None and not calibrate:
        raise ExportError("--calibration and --no-calibration contradict each other; give one")
    path = Path(calibration) if calibration is not None else (
        default_calibration(model_dir) if calibrate and used else None)
    if path is None:
        return None
    if calibration is not None and is_imatrix_file(path):
        if not matrices_ok:
            raise CalibrationError(f"{path} is a GGUF importance-matrix file; this export computes its own matrices "
                                   "from data: give the text or VQA JSONL file they were made from")
        cal = read_imatrix(path)
        return cal if used else None
    records, sha = read_calibration(path, max_samples or MAX_SAMPLES)  # a bad file fails here
    if not used:
        log.info("%s: the calibration data is not needed", unused or "nothing to calibrate")
        return None
    return records, path, sha


# ---------------------------------------------------------------- which layer is which tensor
def weight_fingerprint(w: Any) -> tuple[Any, ...]:
    """Shape and a strided sample of a weight's values: enough to tell a checkpoint's matrices apart."""
    import numpy as np

    flat = np.asarray(w, dtype=np.float32).reshape(-1)
    step = max(1, flat.size // 97)
    return (tuple(w.shape), flat[::step][:97].round(6).tobytes())


def checkpoint_fingerprint(ckpt: Any, key: str) -> tuple[Any, ...]:
    """:func:`weight_fingerprint` of a checkpoint tensor, read without loading it (``Checkpoint.strided``)."""
    shape = tuple(int(d) for d in ckpt.shapes[key])
    step = max(1, math.prod(shape) // 97)
    return (shape, ckpt.strided(key, step, 97).round(6).tobytes())


def _module_names(model: Any, ckpt: Any, entries: list[Any]) -> dict[str, list[str]]:
    """``nn.Linear`` module name -> GGUF names of the tensors holding its weight.

    Module names and checkpoint keys need not agree (transformers renames keys when it loads some layouts), so
    the weights are matched by value: each checkpoint matrix is read once and fingerprinted.
    """
    import torch

    by_key: dict[str, list[str]] = {}
    for e in entries:
        if e.key and len(e.shape) == 2:
            by_key.setdefault(e.key, []).append(e.name)
    prints: dict[tuple[Any, ...], list[str]] = {}
    for key in by_key:
        prints.setdefault(checkpoint_fingerprint(ckpt, key), []).append(key)
    embed = model.get_input_embeddings().weight
    embed_names = [n for e in entries if e.name == "token_embd.weight" for n in [e.name]]
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if mod.weight is embed and embed_names and not any(e.name == "output.weight" for e in entries):
            out[name] = embed_names  # tied head: llama.cpp multiplies by token_embd, so its matrix is that one
            continue
        keys = prints.get(weight_fingerprint(mod.weight.detach().float().cpu().numpy()), [])
        names = [n for k in keys for n in by_key[k]]
        if names:
            out[name] = names
    return out


# ---------------------------------------------------------------- collecting
def compute_imatrix(model_dir: Path, records: list[Any], data_path: Path, data_sha256: str, ckpt: Any,
                    entries: list[Any], max_tokens: int = MAX_TOKENS, system: str | None = None,
                    n_threads: int | None = None) -> Calibration:
    """Run the PyTorch model over ``records`` and collect each mapped layer's input mean squares, keyed by the
    GGUF tensor names of ``entries``.

    Args:
        model_dir: the merged model folder being exported.
        records: calibration records (VQA: prompt + answer, with the image; text: the document).
        data_path, data_sha256: the calibration file and its hash (provenance).
        ckpt: the folder's :class:`edgemed.export.gguf.Checkpoint`.
        entries: the GGUF tensor plans (text and vision) whose matrices to collect.
        max_tokens: tokens per record.
        system: system prompt used where a record has none (the recipe's).
        n_threads: torch threads.
    """
    names: dict[str, list[str]] = {}

    def pick(model: Any) -> set[str]:
        names.update(_module_names(model, ckpt, entries))
        if not names:
            raise ExportError(f"{model_dir}: no linear layer of the model matches a GGUF tensor; cannot calibrate")
        return set(names)

    cal, means, counts = _collect(model_dir, records, data_path, data_sha256, pick, max_tokens, system, n_threads)
    for module_name, gguf_names in names.items():
        if module_name not in means:
            continue  # never reached (e.g. the vision tower of a text-only calibration set)
        stored = as_stored(means[module_name], counts[module_name])
        for g in gguf_names:
            cal.matrices[g] = stored
            cal.counts[g] = counts[module_name]
    return cal


def as_stored(mean: Any, count: int) -> Any:
    """``mean`` as it reads back from an imatrix file, which keeps float32 sums and a count (llama.cpp's layout):
    the quantizer is given these values, so an export from the file is byte-identical to the one that wrote it
    (one round trip changes some 15% of the float32 values in the last bit; a second changes none)."""
    import numpy as np

    return ((np.asarray(mean, np.float64) * count).astype(np.float32).astype(np.float64) / count).astype(np.float32)


class WeightImportance:
    """Importance matrices of a model's ``nn.Linear`` layers, found by a weight's values: call it with an ONNX
    MatMul initializer (name, W [K, N], the transposed PyTorch weight) for that weight's matrix, or None.

    Exporters name weights their own way (the genai builder ``...qkv_proj.MatMul.weight``, q, k and v packed along
    N; torch.onnx ``val_226``), so a weight is matched by values: its first column must be the first row of a
    layer's weight, and its first columns that whole weight (a packed weight's parts share their input, hence their
    matrix). Matched matrices collect in :attr:`cal` under the initializer names (its hash covers what was used).
    """

    def __init__(self, cal: Calibration, means: dict[str, Any], counts: dict[str, int],
                 prints: dict[bytes, list[tuple[str, int, tuple[Any, ...]]]]):
        self.cal, self._means, self._counts, self._prints = cal, means, counts, prints

    def __call__(self, name: str, w: Any) -> Any:
        import numpy as np

        if w.ndim != 2:
            return None
        for module, rows, fp in self._prints.get(np.ascontiguousarray(w[:, 0], np.float32).tobytes(), []):
            if module in self._means and rows <= w.shape[1] and weight_fingerprint(w[:, :rows].T) == fp:
                self.cal.matrices[name], self.cal.counts[name] = self._means[module], self._counts[module]
                return self._means[module]
        return None


def compute_weight_importance(model_dir: Path, records: list[Any], data_path: Path, data_sha256: str,
                              max_tokens: int = MAX_TOKENS, system: str | None = None,
                              n_threads: int | None = None) -> WeightImportance:
    """Input mean squares of every ``nn.Linear`` layer of the PyTorch model over ``records`` (arguments as
    :func:`compute_imatrix`), to be matched to an export's weights by value (:class:`WeightImportance`)."""
    import numpy as np
    import torch

    prints: dict[bytes, list[tuple[str, int, tuple[Any, ...]]]] = {}

    def pick(model: Any) -> set[str]:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.detach().float().cpu().numpy()
                prints.setdefault(np.ascontiguousarray(w[0]).tobytes(), []).append((name, w.shape[0],
                                                                                    weight_fingerprint(w)))
        return {m for entries in prints.values() for m, _, _ in entries}

    cal, means, counts = _collect(model_dir, records, data_path, data_sha256, pick, max_tokens, system, n_threads)
    return WeightImportance(cal, means, counts, prints)


def _collect(model_dir: Path, records: list[Any], data_path: Path, data_sha256: str, pick: Any, max_tokens: int,
             system: str | None, n_threads: int | None) -> tuple[Calibration, dict[str, Any], dict[str, int]]:
    """Forward ``records`` through the PyTorch model with hooks on the layers ``pick(model)`` names: the
    calibration's provenance (no matrices yet), and per layer reached its input mean square and row count."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from edgemed.backends.pytorch import TorchBackend
    from edgemed.data import TextRecord

    backend = TorchBackend(model_dir, device="cpu", n_threads=n_threads)
    try:
        names = pick(backend.model)
        sums: dict[str, Any] = {}
        counts: dict[str, int] = {}
        hooks = []

        def hook(module_name: str):
            def pre(_mod, args):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                s = (x * x).sum(0).double().cpu().numpy()
                sums[module_name] = sums.get(module_name, 0.0) + s
                counts[module_name] = counts.get(module_name, 0) + x.shape[0]
            return pre

        for n, mod in backend.model.named_modules():
            if n in names:
                hooks.append(mod.register_forward_pre_hook(hook(n)))
        tokens = images = 0
        try:
            for r in tqdm(records, desc="calibration", unit="sample", leave=False):
                if isinstance(r, TextRecord):
                    seq, image = backend.tokenize(r.text)[:max_tokens], None
                else:
                    image = None
                    if r.image is not None and backend.is_vision:
                        from edgemed.data import load_image

                        image = load_image(r.image)
                    prompt = backend.render(r.question, image=image is not None, system=r.system or system)
                    seq = backend.tokenize(prompt + r.answer)[:max_tokens]
                    if image is not None and backend.image_token_id not in seq:  # truncated away: drop the image
                        image = None
                with torch.inference_mode():
                    backend.logits(seq, image)
                tokens += len(seq)
                images += image is not None
        except DataError as e:
            raise CalibrationError(f"calibration data {data_path}: {e}") from None
        finally:
            for h in hooks:
                h.remove()
    finally:
        backend.close()
    cal = Calibration(str(Path(data_path).absolute()), data_sha256, len(records), tokens, images)
    means = {m: (sums[m] / counts[m]).astype(np.float32) for m in counts}
    return cal, means, counts


def write_imatrix(cal: Calibration, path: Path) -> Path:
    """The matrices in llama.cpp's GGUF imatrix layout (``<name>.in_sum2`` / ``<name>.counts``), so
    ``llama-quantize --imatrix`` can reuse them."""
    import gguf
    import numpy as np

    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, "")
        try:
            w.add_type("imatrix")
            w.add_array("imatrix.datasets", [Path(cal.source).name])
            w.add_uint32("imatrix.chunk_count", cal.samples)
            w.add_uint32("imatrix.chunk_size", MAX_TOKENS)
            w.add_string("edgemed.calibration", json.dumps(cal.provenance(), sort_keys=True))
            for name in sorted(cal.matrices):
                n = cal.counts[name]
                w.add_tensor(f"{name}.in_sum2", (cal.matrices[name].astype(np.float64) * n).astype(np.float32)[None])
                w.add_tensor(f"{name}.counts", np.array([[float(n)]], dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return path

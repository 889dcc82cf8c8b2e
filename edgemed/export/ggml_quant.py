"""llama.cpp's quantization kernels with an importance matrix, called through the libggml-base that
llama-cpp-python ships.

``llama_model_quantize`` takes its importance matrix as a C++ ``std::unordered_map``, which ctypes cannot build,
so a calibrated file is made in two steps: llama.cpp's quantizer runs once without a matrix and decides each
tensor's type (its q4_k_m/q3_k_m/... policy, fallbacks for widths that are not a multiple of 256 included); then
:func:`requantize` quantizes every tensor again at that same type with ``ggml_quantize_chunk`` and the matrix, and
writes the file with gguf-py, copying llama.cpp's metadata. Without a matrix the second step reproduces the
first file's bytes exactly (a test holds it to that).

Which tensors get the matrix is a choice (``weighted_types``): llama.cpp gives it to every quantized tensor. Where a
matrix's width is not a multiple of 256, llama.cpp's k-quant policy falls back to the legacy q4_0/q5_0 blocks, and
on the demo image model weighting those made the whole file worse while every k-quant gained (docs/parity.md), so
``export gguf --imatrix-types k-quants`` weighs the k- and i-quants only.
"""

from __future__ import annotations

import ctypes
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgemed.artifacts import atomic_file
from edgemed.errors import ExportError

_LIB: Any = None
_ROWS_PER_JOB = 64  # rows per ggml_quantize_chunk call; ctypes releases the GIL, so chunks run on threads
# llama.cpp's round-to-nearest block types (no super-blocks): its fallback where a k-quant does not fit the width
LEGACY_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"})
IMATRIX_SCOPES = ("all", "k-quants")  # --imatrix-types: every quantized tensor, or all but LEGACY_TYPES
# the scope of a calibrated export when none is asked for. llama.cpp weighs every quantized tensor ("all"); on the
# models measured here that made q4_k_m worse than uncalibrated once (the demo model's second fine-tune: KL mean
# +27%) and no better once (-1%), while "k-quants" was better than uncalibrated in all four cases measured
# (docs/parity.md, "Which tensors get the matrix" and "A second demo fine-tune"). Matrices whose rows are a
# multiple of 256 get no fallback blocks, so on most models of 1B and more the two scopes write the same file.
DEFAULT_SCOPE = "k-quants"


def check_scope(scope: str) -> str:
    """``scope`` if it is one of :data:`IMATRIX_SCOPES`; ExportError naming them otherwise."""
    if scope not in IMATRIX_SCOPES:
        raise ExportError(f"unknown --imatrix-types {scope!r}; choose from {', '.join(IMATRIX_SCOPES)}")
    return scope


def weighs(scope: str, type_name: str) -> bool:
    """Whether a tensor of GGML type ``type_name`` gets the importance matrix under ``scope``."""
    return check_scope(scope) == "all" or type_name not in LEGACY_TYPES


def _ggml() -> Any:
    """libggml-base from llama-cpp-python's wheel, with the two quantization entry points typed."""
    global _LIB
    if _LIB is None:
        import llama_cpp

        folder = Path(llama_cpp.__file__).parent / "lib"
        names = sorted(folder.glob("libggml-base.*"), key=lambda p: len(p.name)) + sorted(
            folder.glob("ggml-base*.dll"))
        if not names:
            raise ExportError(f"{folder}: no libggml-base in the llama-cpp-python install; reinstall llama-cpp-python")
        lib = ctypes.CDLL(str(names[0]))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        _LIB = lib
    return _LIB


def requires_imatrix(qtype: int) -> bool:
    """Whether ggml refuses to quantize ``qtype`` (a GGML type id) without an importance matrix."""
    return bool(_ggml().ggml_quantize_requires_imatrix(int(qtype)))


def quantize(data: Any, qtype: Any, imatrix: Any = None, n_threads: int = 2) -> Any:
    """Quantize a 2-D float array (rows x n_per_row) to ``qtype`` with ggml's kernel.

    Args:
        data: float32-convertible array; the last axis is the row (GGUF ne[0]).
        qtype: a ``gguf.GGMLQuantizationType``.
        imatrix: per-column importance (length n_per_row), or None for llama.cpp's unweighted rounding.
        n_threads: threads over row chunks.

    Returns:
        uint8 array of gguf's byte shape for that type.
    """
    import gguf
    import numpy as np

    src = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = src.shape[-1]
    rows = src.size // n_per_row
    byte_shape = gguf.quant_shape_to_byte_shape(src.shape, qtype)
    dst = np.empty(byte_shape, dtype=np.uint8)
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (n_per_row,):
            raise ExportError(f"importance matrix of length {imat.size} for rows of {n_per_row}; "
                              "the calibration does not match this model")
    elif requires_imatrix(int(qtype)):
        raise ExportError(f"{qtype.name} needs an importance matrix; pass --calibration FILE")
    lib = _ggml()
    sp, dp = src.ctypes.data, dst.ctypes.data
    ip = imat.ctypes.data if imat is not None else None
    row_bytes = dst.nbytes // rows

    def job(r0: int) -> int:
        n = min(_ROWS_PER_JOB, rows - r0)
        return int(lib.ggml_quantize_chunk(int(qtype), sp, dp, r0 * n_per_row, n, n_per_row, ip))

    with ThreadPoolExecutor(max(1, n_threads)) as pool:
        written = sum(pool.map(job, range(0, rows, _ROWS_PER_JOB)))
    if written != rows * row_bytes:
        raise ExportError(f"ggml wrote {written} bytes quantizing to {qtype.name}, expected {rows * row_bytes}")
    return dst


def _copy_fields(reader: Any, writer: Any, skip: tuple[str, ...]) -> None:
    """Every metadata field of ``reader`` into ``writer`` with its own GGUF value type (gguf_new_metadata's way)."""
    import gguf

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def writer_like(q: Any, path: Path, extra_kv: dict[str, Any] | None = None) -> Any:
    """A ``GGUFWriter`` at ``path`` with the metadata of the reader ``q`` (plus ``extra_kv``, string or uint32) and
    its tensor infos, header written: the caller writes each tensor's bytes in ``q.tensors`` order and closes it."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, q.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    try:
        _copy_fields(q, w, tuple(extra_kv or ()))
        for k, v in (extra_kv or {}).items():
            w.add_key_value(k, v, gguf.GGUFValueType.STRING if isinstance(v, str) else gguf.GGUFValueType.UINT32)
        for t in q.tensors:
            w.add_tensor_info(t.name, tuple(int(x) for x in reversed(t.shape.tolist())), np.dtype(np.float32),
                              int(t.n_bytes), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    except BaseException:
        w.close()
        raise
    return w


def requantize(quantized: Path, source_f16: Path, dst: Path, imatrix: dict[str, Any] | None,
               extra_kv: dict[str, Any] | None = None, n_threads: int = 2, scope: str = "all") -> dict[str, str]:
    """Write ``dst``: the tensors of llama.cpp's ``quantized`` file, each quantized again from ``source_f16`` at
    the type llama.cpp chose, weighted by ``imatrix[name]`` where it has one.

    Args:
        quantized: llama.cpp's (uncalibrated) output, the source of types and metadata.
        source_f16: the f16 file llama.cpp quantized from.
        dst: where to write.
        imatrix: GGUF tensor name -> per-column mean square activation; None quantizes unweighted.
        extra_kv: string metadata to add (e.g. the calibration's provenance).
        n_threads: quantization threads.
        scope: which tensors get their matrix (:data:`IMATRIX_SCOPES`); the others are rounded as llama.cpp
            rounds without one.

    Returns:
        GGUF tensor name -> type name, for tensors quantized with a matrix.
    """
    import gguf
    import numpy as np
    from tqdm import tqdm

    T = gguf.GGMLQuantizationType
    q = gguf.GGUFReader(quantized)
    f = {t.name: t for t in gguf.GGUFReader(source_f16).tensors}
    weighted: dict[str, str] = {}
    with atomic_file(dst) as tmp:
        w = writer_like(q, tmp, extra_kv)
        try:
            for t in tqdm(q.tensors, desc=f"calibrated {dst.stem}", unit="tensor", leave=False):
                qt = T(t.tensor_type)
                if qt in (T.F32, T.F16, T.BF16) or t.name not in f:
                    w.write_tensor_data(np.asarray(t.data))  # kept as llama.cpp wrote it
                    continue
                src = f[t.name]
                if T(src.tensor_type) not in (T.F16, T.F32):
                    raise ExportError(f"{source_f16.name}: tensor {t.name} is {T(src.tensor_type).name}, not f16/f32")
                n_per_row = int(t.shape[0])
                rows = math.prod(int(x) for x in t.shape[1:])
                imat = (imatrix or {}).get(t.name) if weighs(scope, qt.name) else None
                out = quantize(np.asarray(src.data, dtype=np.float32).reshape(rows, n_per_row), qt, imat, n_threads)
                if imat is not None:
                    weighted[t.name] = qt.name
                if out.nbytes != int(t.n_bytes):
                    raise ExportError(f"{t.name}: {out.nbytes} bytes quantized, llama.cpp wrote {t.n_bytes}")
                w.write_tensor_data(out.reshape(-1))
        finally:
            w.close()
    return weighted

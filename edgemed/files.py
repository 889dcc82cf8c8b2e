"""Readers of user files: every failure to parse one becomes an EdgemedError naming the file and what was expected.

A file given to edgemed (recipe, JSONL, image, safetensors, GGUF, ONNX, manifest) is input, and input can be
anything: cut short, the wrong kind, not UTF-8, a folder. Each reader goes through :func:`reading`, so a parser's
own exception (``UnicodeDecodeError``, ``safetensors_rust.SafetensorError``, onnxruntime's ``InvalidProtobuf``,
numpy's ``ValueError`` from a memory map past the end of a file) never reaches the user as a traceback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgemed.errors import ArtifactError, EdgemedError


def _reason(e: BaseException) -> str:
    if isinstance(e, IsADirectoryError):
        return "it is a folder, not a file"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start})"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


@contextlib.contextmanager
def reading(path: Path | str, expected: str, error: type[EdgemedError] = ArtifactError,
            todo: str = "make or export it again") -> Iterator[None]:
    """Turn any parser failure inside the block into ``error``: ``PATH: cannot read EXPECTED (why); TODO``.

    An EdgemedError raised inside passes through unchanged. Any other exception from a third-party parser
    (some raise bare ``Exception`` subclasses, e.g. safetensors and onnxruntime) is also converted: the block
    holds only the read of one file, so whatever it raises is about that file.
    """
    try:
        yield
    except EdgemedError:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring: only a file read is inside the block
        if isinstance(e, MemoryError) or "OutOfMemory" in type(e).__name__:
            raise  # the machine's limit, not the file's fault
        raise error(f"{path}: cannot read it as {expected} ({_reason(e)}); {todo}") from e


def _a_file(path: Path | str, expected: str, error: type[EdgemedError]) -> None:
    if Path(path).is_dir():
        raise error(f"{path}: is a folder; expected {expected}")


def read_text(path: Path | str, expected: str, error: type[EdgemedError] = ArtifactError,
              todo: str = "make or export it again") -> str:
    """A UTF-8 text file (a leading byte-order mark dropped)."""
    _a_file(path, expected, error)
    with reading(path, expected, error, todo):
        return Path(path).read_bytes().decode("utf-8-sig")


def read_json(path: Path | str, expected: str, error: type[EdgemedError] = ArtifactError,
              todo: str = "make or export it again", kind: type = dict) -> Any:
    """A JSON file whose top level is ``kind`` (dict by default)."""
    text = read_text(path, expected, error, todo)
    with reading(path, expected, error, todo):
        obj = json.loads(text)
    if not isinstance(obj, kind):
        got = {dict: "object", list: "list"}.get(type(obj), type(obj).__name__)
        want = {dict: "object", list: "list"}.get(kind, kind.__name__)
        raise error(f"{path}: {expected} must be a JSON {want}, got a JSON {got}; {todo}")
    return obj


def safetensors_keys(path: Path | str, error: type[EdgemedError] = ArtifactError) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, checked against the file's size (header only)."""
    from safetensors import safe_open

    _a_file(path, "a safetensors file", error)
    with reading(path, "a safetensors file", error), safe_open(str(path), "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - no __iter__


def load_safetensors(path: Path | str, error: type[EdgemedError] = ArtifactError) -> dict[str, Any]:
    """Every tensor of a safetensors file as torch tensors."""
    from safetensors.torch import load_file

    _a_file(path, "a safetensors file", error)
    with reading(path, "a safetensors file", error):
        return load_file(str(path))


def check_gguf(path: Path | str) -> None:
    """Parse a GGUF file's header and tensor table, so a cut or foreign file is refused before llama.cpp sees it
    (llama.cpp only says that loading failed, or worse)."""
    from edgemed.gguf_header import read_header

    path = Path(path)
    _a_file(path, "a GGUF file", ArtifactError)
    with reading(path, "a GGUF file", todo="the file is damaged or cut short; export it again"):
        if _head(path, 4) != b"GGUF":
            raise ArtifactError(f"{path}: not a GGUF file (no GGUF magic at the start); export it again")
        read_header(path)  # every tensor's data range: one that runs past the end of the file fails here


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def onnx_session(path: Path | str, *args: Any, **kw: Any) -> Any:
    """An onnxruntime InferenceSession of ``path``; a damaged graph becomes an ArtifactError naming the file."""
    import onnxruntime as ort

    _a_file(path, "an ONNX graph", ArtifactError)
    with reading(path, "an ONNX graph", todo="the file is damaged or cut short; export it again"):
        return ort.InferenceSession(str(path), *args, **kw)

"""A GGUF file's header read in one pass: its key-value metadata and tensor table, each tensor's data range checked
against the file's size.

gguf-py's ``GGUFReader`` makes a numpy view for every element of every array, so opening a file whose tokenizer
holds 262144 pieces (Gemma 3) took 20-40 s on two busy cores, twice per file in a parity run (the backend's check
and parity's file checks). Here arrays of strings are skipped over and numeric arrays read as one numpy array:
well under a second. The layout is gguf-py's (``gguf.constants``): little- or big-endian, versions 2 and 3.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# GGUFValueType: struct format of each scalar type (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class StringArray:
    """An array of strings in the metadata (tokenizer pieces, merges): skipped, only its length is kept."""

    count: int


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table; ``offset`` is absolute in the file, ``nbytes`` the data's size."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass
class GGUFHeader:
    """What :func:`read_header` found: version, metadata (key -> value) and the tensor table."""

    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


class _Cursor:
    def __init__(self, buf: Any, endian: str):
        self.buf, self.pos, self.e = buf, 0, endian
        self._structs: dict[str, struct.Struct] = {}

    def take(self, fmt: str) -> Any:
        s = self._structs.get(fmt) or self._structs.setdefault(fmt, struct.Struct(self.e + fmt))
        if self.pos + s.size > len(self.buf):
            raise ValueError(f"the header runs past the end of the file (at byte {self.pos})")
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end of the file (at byte {self.pos})")
        out = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {self.pos}")
        return self.take(_SCALARS[vtype])

    def array(self) -> Any:
        etype, n = self.take("I"), self.take("Q")
        if etype in _SCALARS:
            item = struct.calcsize(_SCALARS[etype])
            if self.pos + n * item > len(self.buf):
                raise ValueError(f"an array of {n} values runs past the end of the file (at byte {self.pos})")
            dt = np.dtype(_SCALARS[etype] if etype != 7 else "?").newbyteorder(self.e)
            out = np.frombuffer(self.buf, dt, n, self.pos).copy()
            self.pos += n * item
            return out
        if etype == _STRING:
            unpack, end, pos = struct.Struct(self.e + "Q").unpack_from, len(self.buf), self.pos
            for _ in range(n):  # only the lengths are read: no object per piece
                if pos + 8 > end:
                    raise ValueError("an array of strings runs past the end of the file")
                pos += 8 + unpack(self.buf, pos)[0]
            if pos > end:
                raise ValueError("an array of strings runs past the end of the file")
            self.pos = pos
            return StringArray(n)
        if etype == _ARRAY:
            return [self.array() for _ in range(n)]
        raise ValueError(f"unknown GGUF array element type {etype} at byte {self.pos}")


def _parse(cur: _Cursor, version: int) -> tuple[GGUFHeader, list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata, raw tensor table, where the table ends) from the byte after the version."""
    cur.pos = 8
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    header = GGUFHeader(version)
    for _ in range(n_kv):
        key = cur.string()
        if key in header.fields:
            raise ValueError(f"duplicate key {key!r}")
        header.fields[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
        infos.append((name, dims, cur.take("I"), cur.take("Q")))
    return header, infos, cur.pos


def read_header(path: Path | str) -> GGUFHeader:
    """Parse the metadata and the tensor table of a GGUF file, checking that every tensor's data lies inside it.

    Raises:
        ValueError: not a GGUF file, an unsupported version, an unknown type, a duplicate key or tensor name, or a
            header or tensor that runs past the end of the file (a cut file).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as fh:
        size = path.stat().st_size
        if size < 24:
            raise ValueError(f"{size} bytes: too short for a GGUF header")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != GGUF_MAGIC:
                raise ValueError("no GGUF magic at the start")
            endian = "<"
            (version,) = struct.unpack_from("<I", buf, 4)
            if version & 0xFFFF == 0:  # written big-endian
                endian = ">"
                (version,) = struct.unpack_from(">I", buf, 4)
            if version not in VERSIONS:
                raise ValueError(f"GGUF version {version} is not supported (only {VERSIONS})")
            view = memoryview(buf)
            try:
                header, infos, end = _parse(_Cursor(view, endian), version)
            finally:
                view.release()  # the map closes only once no view of it is left
    align = int(header.fields.get("general.alignment", DEFAULT_ALIGNMENT))
    start = end + (-end % align)
    seen: set[str] = set()
    for name, dims, gtype, rel in infos:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        nbytes = n // block * type_size
        offset = start + rel
        if offset + nbytes > size:
            raise ValueError(f"tensor {name} ({nbytes} bytes at {offset}) runs past the end of the file ({size} bytes)")
        header.tensors.append(TensorInfo(name, tuple(reversed(dims)), gtype, offset, nbytes))
    return header

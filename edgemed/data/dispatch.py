"""``read_dataset``: any supported data file by its format (sniffed from the first record where not given), and
``dataset_sha256`` over a data file and its images. Apart from ``readers`` because it dispatches to both edgemed's
readers and the public layouts of ``edgemed.datasets``, which build on ``readers``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgemed.artifacts import sha256_file
from edgemed.data.readers import (
    FORMATS,
    SLAKE_IMAGES,
    VQA_RAD_IMAGES,
    load_json_list,
    read_slake,
    read_text_jsonl,
    read_vqa_jsonl,
    read_vqa_rad,
)
from edgemed.data.records import TextRecord, VQARecord, parse_failure, read_lines, type_name
from edgemed.errors import DataError


def _sniff_jsonl(path: Path) -> str:
    for lineno, text in read_lines(path):
        if text is None:
            raise DataError(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({parse_failure(e)}); cannot tell the format; fix "
                            "the line or pass fmt/--format") from None
        if isinstance(obj, dict) and "question" in obj:
            return "vqa"
        if isinstance(obj, dict) and "text" in obj:
            return "text"
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: is a JSON {type_name(obj)}, not an object; each line must hold one "
                            "JSON object")
        raise DataError(f"{path}:{lineno}: the first record has neither 'question' (VQA) nor 'text' (text corpus); "
                        "fix the file or pass fmt/--format")
    raise AssertionError("unreachable: read_lines raises on empty files")


def _sniff_json(path: Path) -> str:
    from edgemed.datasets import detect_format

    try:
        if detect_format(path) == "r2gen":  # an object of train/val/test lists, not a list of records
            return "r2gen"
    except DataError:
        pass  # not R2Gen: the VQA-RAD / SLAKE checks below say what is wrong
    items = load_json_list(path, "VQA-RAD or SLAKE")
    first = items[0] if isinstance(items[0], dict) else {}
    if "image_name" in first:
        return "vqa-rad"
    if "img_name" in first:
        return "slake"
    raise DataError(f"{path}: a JSON list whose first record has neither 'image_name' (VQA-RAD) nor 'img_name' "
                    "(SLAKE); pass fmt/--format, or convert it to edgemed VQA JSONL")


def _sniff(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _sniff_jsonl(path)
    if suffix == ".json":
        return _sniff_json(path)
    if suffix in (".pkl", ".parquet"):
        return "pathvqa"
    raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; use .jsonl or .json, "
                    f"or pass fmt/--format (one of {', '.join(FORMATS[1:])})")


def read_dataset(path: Path | str, fmt: str = "auto", image_root: Path | str | None = None,
                 allow_outside: bool = False, *, split: str | None = None, trust_pickle: bool = False
                 ) -> list[VQARecord] | list[TextRecord]:
    """Read any supported data file.

    Args:
        path: A ``.jsonl`` (edgemed VQA or text schema) or ``.json`` (VQA-RAD or SLAKE) file.
        fmt: One of "auto", "vqa", "text", "vqa-rad", "slake". "auto" looks at the first record.
        image_root: Image folder. Defaults: the JSONL's folder; for VQA-RAD ``<json folder>/VQA_RAD Image
            Folder``; for SLAKE ``<json folder>/imgs``.
        allow_outside: Accept image paths that lead out of the image folder (refused by default).
        split: "pathvqa"/"r2gen" and a VQA-RAD split go to ``edgemed.datasets`` (R2Gen's default here: train).
        trust_pickle: Allow PathVQA's release pickles.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such data file; give a .jsonl (edgemed) or .json (VQA-RAD, SLAKE) file")
    if fmt == "auto":
        fmt = _sniff(path)
    if fmt in ("pathvqa", "r2gen") or (fmt == "vqa-rad" and split is not None):
        from edgemed.datasets import read_data  # the public layouts as downloaded

        if fmt == "r2gen" and split is None:
            split = "train"
        return read_data(path, fmt, image_root=image_root, split=split, trust_pickle=trust_pickle)
    if fmt == "vqa":
        return read_vqa_jsonl(path, image_root, allow_outside)
    if fmt == "text":
        return read_text_jsonl(path)
    if fmt == "vqa-rad":
        return read_vqa_rad(path, image_root if image_root is not None else path.parent / VQA_RAD_IMAGES,
                            allow_outside)
    return read_slake(path, image_root if image_root is not None else path.parent / SLAKE_IMAGES,
                      allow_outside=allow_outside)


def dataset_sha256(path: Path | str, fmt: str = "auto", image_root: Path | str | None = None,
                   allow_outside: bool = False, **read_kw: Any) -> str:
    """One sha256 over a data file and every image it references (for manifests).

    Images enter by their path relative to the data file's folder and their content, so moving the whole
    data set elsewhere keeps the hash; editing any line or any image changes it.
    """
    path = Path(path)
    records = read_dataset(path, fmt, image_root, allow_outside, **read_kw)
    h = hashlib.sha256(b"edgemed-dataset-v1\n")
    h.update(f"data\0{sha256_file(path)}\n".encode())
    images = sorted({r.image for r in records if isinstance(r, VQARecord) and r.image is not None})
    for img in images:
        rel = Path(os.path.relpath(img, path.parent)).as_posix()
        h.update(f"{rel}\0{sha256_file(img)}\n".encode())
    return h.hexdigest()

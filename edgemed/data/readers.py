"""Readers: edgemed's VQA, text and probe JSONL, VQA-RAD and SLAKE as downloaded, the format dispatch, and the
data set hash that manifests record. Every reader checks every record and reports all bad ones in one error, so a
broken file is fixed in one pass (the schemas are in ``edgemed.data.records``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgemed.data.records import (
    ProbeLine,
    ProbeRecord,
    Problems,
    SlakeItem,
    TextLine,
    TextRecord,
    VQALine,
    VQARadItem,
    VQARecord,
    parse_failure,
    read_jsonl,
    type_name,
    validate,
)
from edgemed.errors import DataError

FORMATS = ("auto", "vqa", "text", "vqa-rad", "slake", "pathvqa", "r2gen")
VQA_RAD_IMAGES = "VQA_RAD Image Folder"  # folder name in the public VQA-RAD download
SLAKE_IMAGES = "imgs"  # folder name in the public SLAKE download
PROBE_SHAPE = '{"question": "...", "image": "optional/path.png", "system": "optional"}'

_OUTSIDE_HINT = ("move it under that folder, set image_root, or allow it explicitly (recipe: "
                 "data.allow_outside_images: true)")


def _resolve_image(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _outside(image: Path, base: Path) -> bool:
    """True when ``image`` (links followed) is not under ``base``: a data file names images inside its folder
    unless the caller allows more, as ``serve --allow-dir`` does for the server."""
    try:
        return not image.resolve().is_relative_to(base.resolve())
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte in the name
        return True


# ---------------------------------------------------------------------------------------------- JSONL
def read_vqa_jsonl(path: Path | str, image_root: Path | str | None = None, allow_outside: bool = False
                   ) -> list[VQARecord]:
    """Read an edgemed VQA JSONL file, checking every line (schema: ``edgemed.data.records``).

    Args:
        path: The JSONL file.
        image_root: Folder that relative image paths are resolved against (default: the JSONL's folder).
        allow_outside: Accept image paths that lead out of that folder (absolute, ``..``, or a link).

    Returns:
        The records, in file order.

    Raises:
        DataError: listing every bad line (bad JSON, missing, unknown or wrongly typed key, missing image file).
    """
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent
    problems = Problems(path)

    def build(where: str, obj: dict[str, Any], line: VQALine | None) -> VQARecord | None:
        n_before = len(problems)
        image_s = obj.get("image")
        image = None
        if isinstance(image_s, str):  # checked even when another key is wrong: one pass fixes the line
            image = _resolve_image(image_s, base)
            if not allow_outside and _outside(image, base):
                problems.add(where, f"image {image_s!r} is outside the data folder {base}; {_OUTSIDE_HINT}")
            elif not image.is_file():
                problems.add(where, f"image file {image} does not exist (key 'image' = {image_s!r}, resolved "
                                    f"against {base}); fix the path or pass image_root / --image-root")
        return line.record(image, where) if line is not None and len(problems) == n_before else None

    records, n_lines = read_jsonl(path, VQALine, problems, build)
    problems.raise_if_any(n_lines)
    return records


def read_text_jsonl(path: Path | str) -> list[TextRecord]:
    """Read a text-corpus JSONL file: one document per line, key ``text``, optional ``title``.

    Raises:
        DataError: listing every bad line.
    """
    path = Path(path)
    problems = Problems(path)
    records, n_lines = read_jsonl(path, TextLine, problems,
                                  lambda where, _, line: line.record(where) if line is not None else None)
    problems.raise_if_any(n_lines)
    return records


def read_probes_jsonl(path: Path | str) -> list[ProbeRecord]:
    """Read a parity probe file: one ``{"question": str, "image": path (optional), "system": str (optional)}``
    per line; image paths are relative to the file's folder.

    Raises:
        DataError: one line naming every bad line as file:line (at most three spelt out).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such probe file; give a JSONL file of {{\"question\": ...}} lines")
    problems = Problems(path)

    def build(where: str, _: dict[str, Any], line: ProbeLine | None) -> ProbeRecord | None:
        if line is None:
            return None
        image = (path.parent / line.image) if line.image is not None else None
        if image is not None and not image.is_file():
            problems.add(where, f"image {line.image!r} is not a file (relative to {path.parent})")
            return None
        return ProbeRecord(line.question, image, line.system, where)

    probes, _ = read_jsonl(path, ProbeLine, problems, build,
                           empty=f"{path}: holds no probes; add one {{\"question\": ...}} per line")
    problems.raise_on_one_line("bad probe file", f"each line must be {PROBE_SHAPE}")
    return probes


# ---------------------------------------------------------------------------------------------- public sets
def load_json_list(path: Path, name: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the {name} JSON file as downloaded")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an over-long integer, nested too deep
        raise DataError(f"{path}: not valid JSON ({parse_failure(e)}); download the {name} file again") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (the {name} layout), got a JSON "
                        f"{type_name(data)}; is this the right file?")
    if not data:
        raise DataError(f"{path}: the list is empty; download the {name} file again")
    return data


def _read_public(path: Path | str, image_dir: Path | str, name: str, model: type[VQARadItem] | type[SlakeItem],
                 keep: Callable[[dict], bool], allow_outside: bool = False) -> list[VQARecord]:
    """Shared body of the VQA-RAD and SLAKE readers."""
    path, image_dir = Path(path), Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: no such image folder; give the {name} image folder as downloaded")
    items = load_json_list(path, name)
    problems = Problems(path, "records")
    image_key = model.model_fields["image"].validation_alias
    records: list[VQARecord] = []
    for i, obj in enumerate(items, start=1):
        label = f"record {i}"
        if not isinstance(obj, dict):
            problems.add(label, f"is a JSON {type_name(obj)}, not an object")
            continue
        if not keep(obj):
            continue
        n_before = len(problems)
        item = validate(model, obj, label, problems)
        image_s = obj.get(image_key)
        image = image_dir / image_s if isinstance(image_s, str) and image_s.strip() else None
        if image is not None and not allow_outside and _outside(image, image_dir):
            problems.add(label, f"image {image_s!r} is outside the image folder {image_dir}; {_OUTSIDE_HINT}")
        elif image is not None and not image.is_file():
            problems.add(label, f"image file {image} does not exist; check the image folder (got {image_dir})")
        if item is not None and image is not None and len(problems) == n_before:
            records.append(item.record(image, f"{path}:{i}"))
    problems.raise_if_any(len(items))
    if not records:
        raise DataError(f"{path}: no records left after filtering; check the language filter")
    return records


def read_vqa_rad(json_path: Path | str, image_dir: Path | str, allow_outside: bool = False) -> list[VQARecord]:
    """Read VQA-RAD as downloaded: ``VQA_RAD Dataset Public.json`` and its image folder.

    Each record has ``image_name``, ``question``, ``answer`` (string or number) and ``answer_type``
    ("CLOSED"/"OPEN"; unknown values are inferred from the answer). ``task`` is the lower-cased
    ``question_type`` (e.g. "pres", "pos").
    """
    return _read_public(json_path, image_dir, "VQA-RAD", VQARadItem, lambda o: True, allow_outside)


def read_slake(json_path: Path | str, image_dir: Path | str, lang: str | None = "en", allow_outside: bool = False
               ) -> list[VQARecord]:
    """Read SLAKE as downloaded: ``train.json``/``validate.json``/``test.json`` and its ``imgs`` folder.

    Args:
        json_path: One of SLAKE's split files.
        image_dir: SLAKE's ``imgs`` folder (``img_name`` is relative to it, e.g. ``xmlab102/source.jpg``).
        lang: Keep only questions whose ``q_lang`` is this ("en" or "zh"); None keeps all.
    """
    return _read_public(json_path, image_dir, "SLAKE", SlakeItem, lambda o: lang is None or o.get("q_lang") == lang,
                        allow_outside)

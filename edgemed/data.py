"""Data: VQA and text records, readers for edgemed's JSONL and for public medical VQA sets, image loading
(PNG, JPEG, DICOM) and the bundled synthetic demo set.

Schemas (one JSON object per line, UTF-8):

* VQA JSONL: ``{"image": "images/x.png" | null, "question": str, "answer": str, "answer_type": "closed" | "open",
  "system": str, "role": str, "task": str}``. ``image`` is relative to the JSONL's folder (or to ``image_root``);
  ``answer_type`` may be left out (yes/no answers are then closed, all others open); ``system``, ``role`` and
  ``task`` are optional free-form strings (system prompt, persona tag, task name for per-task scores).
* Text JSONL (for text-decoder recipes): ``{"text": str, "title": str}``, one document per line, title optional.

Every reader checks every line and reports all bad lines in one error, so a broken file is fixed in one pass.

Demo-set convention: the phantom radiographs follow the radiological display convention (as if viewing a PA film,
the patient's right lung is on the image's left), but every label and question in the demo set says "left" and
"right" meaning **the left or right half of the image**, and the question text says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgemed.artifacts import atomic_dir, sha256_file
from edgemed.errors import DataError
from edgemed.files import reading

DEFAULT_MAX_PIXELS = 50_000_000
PIL_FORMATS = ("PNG", "JPEG")  # the only raster formats decoded: a smaller attack surface for the server
IMAGE_MIMES = ("image/png", "image/jpeg", "image/jpg", "application/dicom", "application/octet-stream")
DICOM_MIMES = ("application/dicom",)
FORMATS = ("auto", "vqa", "text", "vqa-rad", "slake", "pathvqa", "r2gen")
ANSWER_TYPES = ("closed", "open")
MAX_LISTED = 10  # bad lines spelt out in one error; the rest are counted

VQA_RAD_IMAGES = "VQA_RAD Image Folder"  # folder name in the public VQA-RAD download
SLAKE_IMAGES = "imgs"  # folder name in the public SLAKE download

AnswerType = Literal["closed", "open"]


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class VQARecord:
    """One visual (or text-only) question with its reference answer.

    Attributes:
        question: The question text.
        answer: The reference answer.
        image: Absolute image path, or None for a text-only question.
        answer_type: "closed" (yes/no and other fixed-choice answers) or "open".
        system: Optional system prompt.
        role: Optional free-form persona tag, passed through to recipes.
        task: Optional task name, used to break scores down by task.
        source: Where the record came from, "file:N" (N: line of a JSONL, record number of a JSON list).
        id: The record's own id in its data file (qid, study id), where the reader knows it (edgemed.datasets).
    """

    question: str
    answer: str
    image: Path | None
    answer_type: AnswerType
    system: str | None = None
    role: str | None = None
    task: str | None = None
    source: str = ""
    id: str | None = None


@dataclass(frozen=True)
class TextRecord:
    """One document of a text corpus.

    Attributes:
        text: The document body.
        source: Where the record came from, "file:line".
        title: Optional title.
    """

    text: str
    source: str
    title: str | None = None


def infer_answer_type(answer: str) -> AnswerType:
    """``closed`` for yes/no answers, ``open`` for everything else."""
    return "closed" if answer.strip().lower().rstrip(".") in ("yes", "no") else "open"


# ---------------------------------------------------------------- validation helpers
class _Problems:
    """Collects every bad record of one file, then raises them together."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def raise_if_any(self, total: int, unit: str = "lines") -> None:
        if not self.items:
            return
        n = len(self.items)
        if n == 1:  # one problem: one line, naming file and line
            raise DataError(self.items[0])
        head = f"{self.path}: {n} problem{'s' if n != 1 else ''} in {total} {unit}; fix them and run again"
        lines = [head, *(f"  {p}" for p in self.items[:MAX_LISTED])]
        if n > MAX_LISTED:
            lines.append(f"  ... and {n - MAX_LISTED} more")
        raise DataError("\n".join(lines))


def _type_name(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "array", bool: "boolean", str: "string"}.get(
        type(v), "number")


def _get_str(obj: dict, key: str, where: str, problems: _Problems, *, required: bool,
             coerce_numbers: bool = False) -> str | None:
    """Return ``obj[key]`` as a non-empty string, None if optional and absent/null; record a problem otherwise."""
    if key not in obj or obj[key] is None:
        if required:
            problems.add(where, f"missing key {key!r} (a non-empty string); add it to the record")
        return None
    v = obj[key]
    if coerce_numbers and isinstance(v, int | float) and not isinstance(v, bool):
        v = str(v)  # public sets store numeric answers such as 2 as JSON numbers
    if not isinstance(v, str):
        problems.add(where, f"key {key!r} must be a string, got {_type_name(v)} ({json.dumps(v)[:40]}); "
                            f"write it as a JSON string")
        return None
    if required and not v.strip():
        problems.add(where, f"key {key!r} is empty; give a non-empty string")
        return None
    return v


def _answer_type(obj: dict, key: str, answer: str | None, where: str, problems: _Problems,
                 *, strict: bool) -> AnswerType:
    """Normalise an answer type (any case); infer it from the answer if absent (or, if not strict, unknown)."""
    raw = obj.get(key)
    if isinstance(raw, str) and raw.strip().lower() in ANSWER_TYPES:
        return raw.strip().lower()  # type: ignore[return-value]
    if raw is not None and strict:
        problems.add(where, f"key {key!r} must be \"closed\" or \"open\", got {json.dumps(raw)[:40]}; "
                            f"fix it or leave the key out to infer it from the answer")
    return infer_answer_type(answer or "")


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


_OUTSIDE_HINT = ("move it under that folder, set image_root, or allow it explicitly (recipe: "
                 "data.allow_outside_images: true)")


def _read_lines(path: Path) -> list[tuple[int, str | None]]:
    """(line number, text or None if not UTF-8) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file; check the path")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out: list[tuple[int, str | None]] = []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((i, line.decode("utf-8")))
        except UnicodeDecodeError:
            out.append((i, None))
    if not out:
        raise DataError(f"{path}: the file is empty; it must hold one JSON record per line")
    return out


def _parse_failure(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return getattr(e, "msg", None) or str(e).split("\n")[0][:120] or type(e).__name__


def _parse_jsonl(path: Path, problems: _Problems) -> tuple[list[tuple[str, dict]], int]:
    """Parse every line into (source, object); bad lines go to ``problems``. Also returns the line count."""
    objs: list[tuple[str, dict]] = []
    lines = _read_lines(path)
    for lineno, text in lines:
        where = f"{path}:{lineno}"
        if text is None:
            problems.add(where, "not UTF-8 text; save the file as UTF-8")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.add(where, f"not valid JSON ({e.msg} at column {e.colno}); each line must hold one JSON "
                                "object, e.g. {\"question\": \"...\", \"answer\": \"...\"}")
            continue
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, or nesting deeper than json's
            problems.add(where, f"not a usable JSON record ({_parse_failure(e)}); each line must hold one JSON "
                                "object of strings")
            continue
        if not isinstance(obj, dict):
            problems.add(where, f"is a JSON {_type_name(obj)}, not an object; each line must hold one JSON object")
            continue
        objs.append((where, obj))
    return objs, len(lines)


# ---------------------------------------------------------------- JSONL readers
def read_vqa_jsonl(path: Path | str, image_root: Path | str | None = None, allow_outside: bool = False
                   ) -> list[VQARecord]:
    """Read an edgemed VQA JSONL file, checking every line (see the module docstring for the schema).

    Args:
        path: The JSONL file.
        image_root: Folder that relative image paths are resolved against (default: the JSONL's folder).
        allow_outside: Accept image paths that lead out of that folder (absolute, ``..``, or a link).

    Returns:
        The records, in file order.

    Raises:
        DataError: listing every bad line (bad JSON, missing or wrongly typed key, missing image file).
    """
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent
    problems = _Problems(path)
    parsed, n_lines = _parse_jsonl(path, problems)
    records: list[VQARecord] = []
    for where, obj in parsed:
        n_before = len(problems.items)
        question = _get_str(obj, "question", where, problems, required=True)
        answer = _get_str(obj, "answer", where, problems, required=True)
        image_s = _get_str(obj, "image", where, problems, required=False)
        system = _get_str(obj, "system", where, problems, required=False)
        role = _get_str(obj, "role", where, problems, required=False)
        task = _get_str(obj, "task", where, problems, required=False)
        atype = _answer_type(obj, "answer_type", answer, where, problems, strict=True)
        image = None
        if image_s is not None:
            image = _resolve_image(image_s, base)
            if not allow_outside and _outside(image, base):
                problems.add(where, f"image {image_s!r} is outside the data folder {base}; {_OUTSIDE_HINT}")
            elif not image.is_file():
                problems.add(where, f"image file {image} does not exist (key 'image' = {image_s!r}, resolved "
                                    f"against {base}); fix the path or pass image_root / --image-root")
        if len(problems.items) == n_before:
            records.append(VQARecord(question, answer, image, atype, system, role, task, where))
    problems.raise_if_any(n_lines)
    return records


def read_text_jsonl(path: Path | str) -> list[TextRecord]:
    """Read a text-corpus JSONL file: one document per line, key ``text``, optional ``title``.

    Raises:
        DataError: listing every bad line.
    """
    path = Path(path)
    problems = _Problems(path)
    parsed, n_lines = _parse_jsonl(path, problems)
    records: list[TextRecord] = []
    for where, obj in parsed:
        n_before = len(problems.items)
        text = _get_str(obj, "text", where, problems, required=True)
        title = _get_str(obj, "title", where, problems, required=False)
        if len(problems.items) == n_before:
            records.append(TextRecord(text, where, title))  # type: ignore[arg-type]
    problems.raise_if_any(n_lines)
    return records


# ---------------------------------------------------------------- public data sets
def _load_json_list(path: Path, name: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the {name} JSON file as downloaded")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an over-long integer, nested too deep
        raise DataError(f"{path}: not valid JSON ({_parse_failure(e)}); download the {name} file again") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (the {name} layout), got a JSON "
                        f"{_type_name(data)}; is this the right file?")
    if not data:
        raise DataError(f"{path}: the list is empty; download the {name} file again")
    return data


def _read_public(path: Path | str, image_dir: Path | str, name: str, keys: dict[str, str],
                 keep: Callable[[dict], bool], task_key: str, allow_outside: bool = False) -> list[VQARecord]:
    """Shared body of the VQA-RAD and SLAKE readers; ``keys`` maps image/question/answer/answer_type names."""
    path, image_dir = Path(path), Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: no such image folder; give the {name} image folder as downloaded")
    items = _load_json_list(path, name)
    problems = _Problems(path)
    records: list[VQARecord] = []
    for i, obj in enumerate(items, start=1):
        where = f"{path}:{i}"
        label = f"record {i}"
        if not isinstance(obj, dict):
            problems.add(label, f"is a JSON {_type_name(obj)}, not an object")
            continue
        if not keep(obj):
            continue
        n_before = len(problems.items)
        question = _get_str(obj, keys["question"], label, problems, required=True)
        answer = _get_str(obj, keys["answer"], label, problems, required=True, coerce_numbers=True)
        image_s = _get_str(obj, keys["image"], label, problems, required=True)
        atype = _answer_type(obj, keys["answer_type"], answer, label, problems, strict=False)
        task = obj.get(task_key)
        image = None
        if image_s is not None:
            image = image_dir / image_s
            if not allow_outside and _outside(image, image_dir):
                problems.add(label, f"image {image_s!r} is outside the image folder {image_dir}; {_OUTSIDE_HINT}")
            elif not image.is_file():
                problems.add(label, f"image file {image} does not exist; check the image folder "
                                    f"(got {image_dir})")
        if len(problems.items) == n_before:
            records.append(VQARecord(question.strip(), answer.strip(), image, atype,  # type: ignore[union-attr]
                                     task=task.strip().lower() if isinstance(task, str) else None, source=where))
    problems.raise_if_any(len(items), unit="records")
    if not records:
        raise DataError(f"{path}: no records left after filtering; check the language filter")
    return records


def read_vqa_rad(json_path: Path | str, image_dir: Path | str, allow_outside: bool = False) -> list[VQARecord]:
    """Read VQA-RAD as downloaded: ``VQA_RAD Dataset Public.json`` and its image folder.

    Each record has ``image_name``, ``question``, ``answer`` (string or number) and ``answer_type``
    ("CLOSED"/"OPEN"; unknown values are inferred from the answer). ``task`` is the lower-cased
    ``question_type`` (e.g. "pres", "pos").
    """
    keys = {"image": "image_name", "question": "question", "answer": "answer", "answer_type": "answer_type"}
    return _read_public(json_path, image_dir, "VQA-RAD", keys, lambda o: True, "question_type", allow_outside)


def read_slake(json_path: Path | str, image_dir: Path | str, lang: str | None = "en", allow_outside: bool = False
               ) -> list[VQARecord]:
    """Read SLAKE as downloaded: ``train.json``/``validate.json``/``test.json`` and its ``imgs`` folder.

    Args:
        json_path: One of SLAKE's split files.
        image_dir: SLAKE's ``imgs`` folder (``img_name`` is relative to it, e.g. ``xmlab102/source.jpg``).
        lang: Keep only questions whose ``q_lang`` is this ("en" or "zh"); None keeps all.
    """
    keys = {"image": "img_name", "question": "question", "answer": "answer", "answer_type": "answer_type"}
    return _read_public(json_path, image_dir, "SLAKE", keys,
                        lambda o: lang is None or o.get("q_lang") == lang, "content_type", allow_outside)


def _sniff_jsonl(path: Path) -> str:
    for lineno, text in _read_lines(path):
        if text is None:
            raise DataError(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({_parse_failure(e)}); cannot tell the format; fix "
                            "the line or pass fmt/--format") from None
        if isinstance(obj, dict) and "question" in obj:
            return "vqa"
        if isinstance(obj, dict) and "text" in obj:
            return "text"
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: is a JSON {_type_name(obj)}, not an object; each line must hold one "
                            "JSON object")
        raise DataError(f"{path}:{lineno}: the first record has neither 'question' (VQA) nor 'text' (text corpus); "
                        "fix the file or pass fmt/--format")
    raise AssertionError("unreachable: _read_lines raises on empty files")


def _sniff_json(path: Path) -> str:
    from edgemed.datasets import detect_format

    try:
        if detect_format(path) == "r2gen":  # an object of train/val/test lists, not a list of records
            return "r2gen"
    except DataError:
        pass  # not R2Gen: the VQA-RAD / SLAKE checks below say what is wrong
    items = _load_json_list(path, "VQA-RAD or SLAKE")
    first = items[0] if isinstance(items[0], dict) else {}
    if "image_name" in first:
        return "vqa-rad"
    if "img_name" in first:
        return "slake"
    raise DataError(f"{path}: a JSON list whose first record has neither 'image_name' (VQA-RAD) nor 'img_name' "
                    "(SLAKE); pass fmt/--format, or convert it to edgemed VQA JSONL")


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
        if path.suffix.lower() == ".jsonl":
            fmt = _sniff_jsonl(path)
        elif path.suffix.lower() == ".json":
            fmt = _sniff_json(path)
        elif path.suffix.lower() in (".pkl", ".parquet"):
            fmt = "pathvqa"
        else:
            raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; use .jsonl or .json, "
                            f"or pass fmt/--format (one of {', '.join(FORMATS[1:])})")
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


# ---------------------------------------------------------------- images
def _is_dicom(head: bytes, suffix: str = "") -> bool:
    return head[128:132] == b"DICM" or suffix.lower() in (".dcm", ".dicom")


def _dicom_signature(head: bytes) -> bool:
    """A Part 10 file has "DICM" at byte 128; a file without the preamble (older PACS exports) starts with an
    element of group 0002 (file meta) or 0008 (identification). Anything else named .dcm is not DICOM: pydicom's
    forced read would take its bytes for elements and report "no pixel data" instead."""
    return head[128:132] == b"DICM" or (len(head) >= 8 and int.from_bytes(head[:2], "little") in (0x0002, 0x0008))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any decoded mode; 16-bit and float grayscale are stretched min..max to 8 bit (not clipped)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def _load_raster(fp: io.IOBase | Path, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=PIL_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: {e}; refused before decoding (decompression bomb guard); downscale the "
                        "image") from e
    except UnidentifiedImageError as e:
        raise DataError(f"{name}: not a PNG, JPEG or DICOM image; convert it to PNG (or give a DICOM file)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: cannot read the image header ({e}); the file is damaged, export it again") from e
    w, h = im.size
    if w * h > max_pixels:
        from edgemed.dicom import too_many_pixels  # one wording for raster and DICOM images

        raise too_many_pixels(name, w, h, max_pixels)
    try:
        im.load()  # force decoding now, so a truncated file fails here and not deep in a training step
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot decode the {im.format} image ({e}); the file is corrupt or truncated, "
                        "export it again") from e
    return _to_rgb(im)


def _load_dicom(src: Path | io.BytesIO, name: str, max_pixels: int, frame: int | None = None,
                render: str = "voi") -> Image.Image:
    from edgemed.dicom import load_dicom  # the DICOM display pipeline (modality LUT, VOI, frames, colour)

    head = src.read(132)
    src.seek(0)
    if not _dicom_signature(head):
        raise DataError(f"{name}: not a DICOM file (no DICM marker at byte 128, and it does not start with a DICOM "
                        "element); give a DICOM image, or a PNG or JPEG with its own suffix")
    return load_dicom(src, name, max_pixels, frame=frame, render=render)


def load_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, *, frame: int | None = None,
               render: str = "voi") -> Image.Image:
    """Load a PNG, JPEG or DICOM file as an 8-bit RGB image.

    DICOM is recognised by the "DICM" marker at byte 128 or a ``.dcm`` suffix and decoded by
    ``edgemed.dicom.load_dicom``: modality LUT, then the VOI LUT or window (LINEAR, LINEAR_EXACT, SIGMOID;
    min..max if absent), MONOCHROME1 inverted, YBR and palette colour to RGB, per-frame values of enhanced
    multi-frame files.

    Args:
        path: The image file.
        max_pixels: Refuse images declaring more pixels than this, before decoding them.
        frame: DICOM frame of a multi-frame file (default: the first).
        render: DICOM rendering: "voi" (the file's display settings) or "ct-windows" (MedGemma's three CT
            windows as RGB, for CT).

    Raises:
        DataError: missing, unsupported, corrupt or oversized file, or DICOM without pixel data.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file; give a PNG, JPEG or DICOM file")
    if not path.is_file():
        raise DataError(f"{path}: no such image file; check the path (relative image paths are resolved against "
                        "the JSONL's folder or the image root)")
    with open(path, "rb") as f:
        head = f.read(132)
        f.seek(0)
        with reading(path, "an image", DataError, "give a PNG, JPEG or DICOM file"):
            if _is_dicom(head, path.suffix):
                return _load_dicom(f, str(path), max_pixels, frame, render)  # type: ignore[arg-type]
            return _load_raster(f, str(path), max_pixels)  # type: ignore[arg-type]


def load_image_bytes(data: bytes, mime: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                     name: str = "uploaded image", *, frame: int | None = None, render: str = "voi") -> Image.Image:
    """Load an image sent as bytes (e.g. a data: URL) with the same rules as :func:`load_image`.

    Args:
        data: The encoded image.
        mime: Its media type, if known (image/png, image/jpeg, application/dicom); the content decides
            between PNG and JPEG.
        max_pixels: Refuse images declaring more pixels than this, before decoding them.
        name: How error messages name the image.
        frame: DICOM frame of a multi-frame file (default: the first).
        render: DICOM rendering, as for :func:`load_image`.
    """
    if not data:
        raise DataError(f"{name}: no bytes; send a PNG, JPEG or DICOM image")
    kind = (mime or "").split(";")[0].strip().lower()
    if kind and kind not in IMAGE_MIMES:
        raise DataError(f"{name}: unsupported media type {mime!r}; allowed: {', '.join(IMAGE_MIMES)}")
    with reading(name, "an image", DataError, "send a PNG, JPEG or DICOM image"):
        if kind in DICOM_MIMES or _is_dicom(data[:132]):
            return _load_dicom(io.BytesIO(data), name, max_pixels, frame, render)
        return _load_raster(io.BytesIO(data), name, max_pixels)


# ---------------------------------------------------------------- synthetic demo set
GENERATOR_VERSION = 1
DEMO_SIZE = 64
DEMO_SYSTEM = "You are a radiology assistant. Answer with one word."
CAPTION_SYSTEM = "You are a radiology assistant. Describe the image in one short phrase."
_LUNG_CX = (17.0, 47.0)  # image-left and image-right lung centres (x, pixels)
_LESION_R = {"small": 3.5, "large": 8.0}  # radii far apart, so size is visible even after blur and noise

_Q_PRESENCE = ("Is there a lesion in this radiograph?", "Does this radiograph show a lesion?",
               "Is any lesion visible in this image?")
_Q_LEFT = ("Is the lesion in the left lung (the left half of the image)?",
           "Is the lesion on the left side of the image?")
_Q_SIDE = ("Which side of the image is the lesion on?", "Is the lesion on the left or the right side of the image?")
_Q_SIZE = ("How large is the lesion?", "Is the lesion small or large?")
_Q_ABN = ("What abnormality is seen?", "What abnormality does this radiograph show?")
_Q_CAPTION = "Describe the image."


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, edge-padded (numpy only: the same bytes on every Pillow version)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(a, r, mode="edge")
    p = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, p)


def _phantom(rng: np.random.Generator, lesion: tuple[str, str] | None) -> np.ndarray:
    """One 64x64 phantom chest radiograph (uint8 grey): dark background, a faint body, two bright lung fields,
    and optionally a very bright lesion (side = image half, size small/large)."""
    s = DEMO_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    img = np.full((s, s), 15.0)
    body = ((xx - 32) / 30) ** 2 + ((yy - 34) / 30) ** 2 <= 1
    img[body] = 45.0 + rng.uniform(-5, 5)
    cy = 32.0 + rng.uniform(-1.5, 1.5)
    for cx in _LUNG_CX:
        rx, ry = 11.0 + rng.uniform(-1, 1), 21.0 + rng.uniform(-1.5, 1.5)
        lung = ((xx - cx - rng.uniform(-1, 1)) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        img[lung] = 115.0 + rng.uniform(-10, 10)
    if lesion is not None:
        side, size = lesion
        r = _LESION_R[size] + rng.uniform(-0.3, 0.3)
        lx = _LUNG_CX[0 if side == "left" else 1] + rng.uniform(-2.5, 2.5)
        ly = cy + rng.uniform(-9, 9) * (0.6 if size == "large" else 1.0)
        img[(xx - lx) ** 2 + (yy - ly) ** 2 <= r * r] = 250.0
    img = _blur(img, 1.0) + rng.normal(0.0, 6.0, size=(s, s))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _labels(rng: np.random.Generator, n: int) -> list[tuple[str, str] | None]:
    """Exactly balanced labels, shuffled: half normal, half lesions spread evenly over side x size."""
    combos = [("left", "small"), ("right", "large"), ("right", "small"), ("left", "large")]
    n_lesion = n // 2 + (n % 2) * int(rng.integers(0, 2))
    labels: list[tuple[str, str] | None] = [combos[i % 4] for i in range(n_lesion)]
    labels += [None] * (n - n_lesion)
    order = rng.permutation(n)
    return [labels[i] for i in order]


def _vqa(image: str, question: str, answer: str, answer_type: str, task: str,
         system: str = DEMO_SYSTEM) -> dict[str, Any]:
    return {"image": image, "question": question, "answer": answer, "answer_type": answer_type,
            "system": system, "task": task}


def _questions(rng: np.random.Generator, image: str, lesion: tuple[str, str] | None) -> list[dict[str, Any]]:
    pick = lambda options: options[int(rng.integers(0, len(options)))]  # noqa: E731
    recs = [_vqa(image, pick(_Q_PRESENCE), "yes" if lesion else "no", "closed", "presence")]
    if lesion is None:
        recs.append(_vqa(image, pick(_Q_ABN), "none", "open", "abnormality"))
        return recs
    side, size = lesion
    recs.append(_vqa(image, pick(_Q_LEFT), "yes" if side == "left" else "no", "closed", "side"))
    recs.append(_vqa(image, pick(_Q_SIDE), side, "open", "side"))
    recs.append(_vqa(image, pick(_Q_SIZE), size, "open", "size"))
    return recs


def _caption(lesion: tuple[str, str] | None) -> str:
    if lesion is None:
        return "normal chest radiograph"
    side, size = lesion
    return f"chest radiograph with a {size} lesion in the {side} lung ({side} side of the image)"


_ABSTRACT_TOPICS = (("community-acquired pneumonia", "consolidation"), ("lung cancer", "a pulmonary nodule"),
                    ("tuberculosis", "upper-lobe cavitation"), ("heart failure", "pleural effusion"),
                    ("chronic obstructive pulmonary disease", "hyperinflation"), ("sarcoidosis", "hilar adenopathy"))
_ABSTRACT_MODALITIES = ("chest radiographs", "low-dose CT scans", "portable radiographs", "thoracic CT studies")
_ABSTRACT_METHODS = ("retrospectively reviewed", "prospectively enrolled", "reviewed")


def _abstract(rng: np.random.Generator, i: int) -> dict[str, str]:
    disease, finding = _ABSTRACT_TOPICS[i % len(_ABSTRACT_TOPICS)]
    modality = _ABSTRACT_MODALITIES[int(rng.integers(0, len(_ABSTRACT_MODALITIES)))]
    method = _ABSTRACT_METHODS[int(rng.integers(0, len(_ABSTRACT_METHODS)))]
    n = int(rng.integers(40, 400))
    k = int(rng.integers(5, n // 2))
    sens = int(rng.integers(70, 98))
    text = (f"Background: {finding[0].upper() + finding[1:]} is a common imaging sign in {disease}. "
            f"Methods: We {method} {n} patients evaluated for {disease} with {modality}; two readers recorded "
            f"the presence, side and size of abnormalities. "
            f"Results: {finding[0].upper() + finding[1:]} was present in {k} of {n} patients "
            f"({100 * k / n:.1f}%). Reader sensitivity was {sens}%. "
            f"Conclusion: {modality[0].upper() + modality[1:]} identify {finding} in {disease} with useful "
            f"sensitivity; small findings are missed more often than large ones.")
    return {"title": f"{finding[0].upper() + finding[1:]} on {modality} in {disease}: a study of {n} patients",
            "text": text}


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_demo_set(out: Path | str, seed: int = 0, n_train: int = 480, n_val: int = 48, n_test: int = 96,
                      overwrite: bool = False) -> dict[str, Path]:
    """Write the synthetic phantom-radiograph VQA set (deterministic: the same seed gives the same bytes).

    Images (64x64 PNG under ``images/``) show two lung fields; half carry a bright lesion in the left or right
    half of the image (left/right always mean the image's halves), small or large. Each image gets 2 (normal)
    or 4 (lesion) one-word questions. ``n_*`` count images; splits never share an image.

    Args:
        out: Folder to create (refused if it exists, unless ``overwrite``).
        seed: Random seed.
        n_train: Training images.
        n_val: Validation images.
        n_test: Test images.
        overwrite: Replace an existing folder.

    Returns:
        Paths of the JSONL files: train, validation, test (VQA), captions (train images, "Describe the image."),
        abstracts (text corpus).
    """
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, int) or n < 2:
            raise DataError(f"{name} must be an integer >= 2 (images per split), got {n!r}")
    out = Path(out).absolute()
    rng = np.random.default_rng(seed)
    splits = {"train": n_train, "validation": n_val, "test": n_test}
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        captions: list[dict[str, Any]] = []
        for split, n in splits.items():
            rows: list[dict[str, Any]] = []
            for i, lesion in enumerate(_labels(rng, n)):
                rel = f"images/{split}_{i:04d}.png"
                Image.fromarray(np.repeat(_phantom(rng, lesion)[..., None], 3, axis=2), "RGB").save(tmp / rel)
                rows += _questions(rng, rel, lesion)
                if split == "train":
                    captions.append(_vqa(rel, _Q_CAPTION, _caption(lesion), "open", "caption", CAPTION_SYSTEM))
            _write_jsonl(tmp / f"{split}.jsonl", rows)
            counts[split] = {"images": n, "records": len(rows)}
        _write_jsonl(tmp / "captions.jsonl", captions)
        counts["captions"] = {"images": n_train, "records": len(captions)}
        _write_jsonl(tmp / "abstracts.jsonl", (_abstract(rng, i) for i in range(24)))
        counts["abstracts"] = {"images": 0, "records": 24}
        names = [*splits, "captions", "abstracts"]
        info = {
            "edgemed_dataset": 1,
            "name": "edgemed-phantom-cxr",
            "generator": "edgemed.data.generate_demo_set",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "image_size": DEMO_SIZE,
            "convention": "left/right mean the left/right half of the image (not the patient's side)",
            "counts": counts,
            "sha256": {f"{k}.jsonl": sha256_file(tmp / f"{k}.jsonl") for k in names},
            "dataset_sha256": {f"{k}.jsonl": dataset_sha256(tmp / f"{k}.jsonl") for k in names},
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return {k: out / f"{k}.jsonl" for k in names}

"""Readers for the public medical VQA and report data sets, in the layouts they are downloaded in.

Every reader returns ``edgemed.data.VQARecord`` objects whose ``id`` is the record's own id in the file (qid in
VQA-RAD and SLAKE, id in R2Gen's annotation.json, the row or list index where a layout has none), checks every
record and reports all bad ones in one error naming file and record.

* ``vqa-rad``: the OSF release's ``VQA_RAD Dataset Public.json`` and MEVF's ``trainset.json``/``testset.json``
  (a JSON list; ``phrase_type`` ``test_*`` marks the official test set). Images in ``VQA_RAD Image Folder``
  (OSF) or ``images`` (MEVF) beside the file.
* ``slake``: ``train.json``/``validate.json``/``test.json``, filtered to ``q_lang == "en"`` unless asked;
  images in ``imgs``.
* ``pathvqa``: the release's ``qas/<split>/<split>_qa.pkl`` and ``<split>_vqa.pkl`` (Python pickles: read only
  with ``trust_pickle``, since loading a pickle can run code; even then only plain lists, dicts and strings
  are accepted), images in ``images/<split>/<name>.jpg``; and Hugging Face parquet copies (``image`` struct
  with the bytes, ``question``, ``answer``), whose images are written once to a cache folder.
* ``r2gen``: R2Gen's ``annotation.json`` for IU-Xray and MIMIC-CXR (``{"train": [{"id", "report",
  "image_path": [...]}], "val": [...], "test": [...]}``); reports cleaned as R2Gen cleans them; images under
  ``images`` beside the file (IU-Xray) or the folder given. IU-Xray has two views per study; the first
  (frontal) is used, as the models here take one image.
* ``jsonl``: edgemed's VQA JSONL (``edgemed.data.read_vqa_jsonl``); the id is the ``id`` key, else the line
  number.

Copies without an answer type (Hugging Face VQA-RAD, PathVQA) call an answer closed when it is yes/no.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgemed.data.readers import read_vqa_jsonl
from edgemed.data.records import Problems, VQARecord, infer_answer_type
from edgemed.errors import DataError

FORMATS = ("jsonl", "vqa-rad", "slake", "pathvqa", "r2gen")
SPLITS_R2GEN = ("train", "val", "test")
REPORT_PROMPT = "Write the findings section of the radiology report for this image."
REPORT_TASK = "report"
def _text(obj: dict, key: str, where: str, problems: Problems, *, numbers: bool = False) -> str | None:
    """``obj[key]`` as a non-empty string (numbers allowed where public sets store answers such as 2)."""
    v = obj.get(key)
    if numbers and isinstance(v, int | float) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not v.strip():
        got = "missing" if key not in obj else f"got {json.dumps(v, default=str)[:40]}"
        problems.add(where, f"key {key!r} must be a non-empty string ({got}); is this the right file?")
        return None
    return v.strip()


def _answer_type(raw: Any, answer: str) -> str:
    """CLOSED/OPEN in any case and with stray spaces; otherwise yes/no answers are closed."""
    if isinstance(raw, str) and raw.strip().lower() in ("closed", "open"):
        return raw.strip().lower()
    return infer_answer_type(answer)


def _load_json(path: Path, name: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the {name} file as downloaded")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); download the {name} file again") from e


def _image(root: Path, rel: str, where: str, problems: Problems, check: bool) -> Path | None:
    """``root/rel``, refused when it leaves ``root`` or (with ``check``) does not exist."""
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        problems.add(where, f"image path {rel!r} leaves the image folder {root}; refused")
        return None
    if check and not p.is_file():
        problems.add(where, f"image file {p} does not exist; check the image folder ({root}) or pass --image-root")
        return None
    return p


def _first_dir(*candidates: Path) -> Path:
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def _json_list(path: Path, name: str) -> list:
    data = _load_json(path, name)
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of records (the {name} layout); is this the right "
                        "file?")
    return data


def _read_list(path: Path, name: str, root: Path, keys: tuple[str, str, str, str], keep: Callable[[dict], bool],
               check_images: bool, empty_hint: str) -> list[VQARecord]:
    """VQA-RAD and SLAKE: a JSON list of question dicts; ``keys`` = (id, image, question, answer)."""
    items = _json_list(path, name)
    problems = Problems(path, "records")
    out: list[VQARecord] = []
    kid, kimg, kq, ka = keys
    for i, obj in enumerate(items, start=1):
        where = f"{path}: record {i}"
        if not isinstance(obj, dict):
            problems.add(where, "is not a JSON object")
            continue
        if not keep(obj):
            continue
        n = len(problems.items)
        q, a, img = _text(obj, kq, where, problems), _text(obj, ka, where, problems, numbers=True), \
            _text(obj, kimg, where, problems)
        qid = obj.get(kid)
        if qid is None or isinstance(qid, bool) or not isinstance(qid, int | str):
            problems.add(where, f"key {kid!r} must be the question id (a number or string)")
        image = _image(root, img, where, problems, check_images) if img else None
        if len(problems.items) == n:
            task = obj.get("question_type") or obj.get("content_type")
            out.append(VQARecord(q, a, image, _answer_type(obj.get("answer_type"), a),  # type: ignore[arg-type]
                                 task=task.strip().lower() if isinstance(task, str) else None,
                                 source=f"{path}:{i}", id=str(qid)))
    problems.raise_if_any(len(items))
    if not out:
        raise DataError(f"{path}: no records left after filtering; {empty_hint}")
    return out


def read_vqa_rad(path: Path | str, image_root: Path | str | None = None, split: str | None = None,
                 check_images: bool = True) -> list[VQARecord]:
    """VQA-RAD: the OSF ``VQA_RAD Dataset Public.json`` or MEVF's trainset.json/testset.json.

    Args:
        path: The JSON file.
        image_root: Image folder (default: ``VQA_RAD Image Folder`` or ``images`` beside the file).
        split: "test" keeps phrase_type ``test_*`` (the official test set), "train" the others, None all.
        check_images: Require every image file to exist.
    """
    path = Path(path)
    root = Path(image_root) if image_root else _first_dir(path.parent / "VQA_RAD Image Folder",
                                                          path.parent / "images", path.parent)
    if split not in (None, "all", "train", "test"):
        raise DataError(f"unknown VQA-RAD split {split!r}; choose train, test or all (phrase_type test_* is test)")

    def keep(o: dict) -> bool:
        is_test = str(o.get("phrase_type", "")).startswith("test")
        return split in (None, "all") or (split == "test") == is_test

    return _read_list(path, "VQA-RAD", root, ("qid", "image_name", "question", "answer"), keep, check_images,
                      f"no phrase_type matches split {split!r}; pass --split all, or the other split's file")


def read_slake(path: Path | str, image_root: Path | str | None = None, lang: str | None = "en",
               check_images: bool = True) -> list[VQARecord]:
    """SLAKE's train/validate/test.json, keeping ``q_lang == lang`` ("en" by default; None keeps all)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent / "imgs"
    return _read_list(path, "SLAKE", root, ("qid", "img_name", "question", "answer"),
                      lambda o: lang is None or o.get("q_lang") == lang, check_images,
                      f"no question has q_lang {lang!r}; pass another language or all")


# ---------------------------------------------------------------- PathVQA
class _PlainUnpickler(pickle.Unpickler):
    """Refuses every global: a pickle of lists, dicts, strings and numbers needs none, and any other object
    could run code while loading."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the pickle asks for {module}.{name}; only plain lists, dicts, strings and "
                                     "numbers are read")


def _load_pickle(path: Path, trust: bool) -> Any:
    if not trust:
        raise DataError(f"{path}: is a Python pickle, and loading a pickle can run code it contains; pass "
                        "--trust-pickle if it is PathVQA's own release file, or use a parquet copy")
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="latin1").load()  # latin1: the release may hold Python 2 strings
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError) as e:
        raise DataError(f"{path}: cannot read the pickle ({e}); download PathVQA's qas files again") from e


def _pathvqa_pkl(path: Path, image_root: Path | None, trust: bool, check_images: bool) -> list[VQARecord]:
    items = _load_pickle(path, trust)
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty list of question dicts (PathVQA's qas layout)")
    # qas/<split>/<file>.pkl; images/<split>/<name>.jpg
    root = image_root or path.parent.parent.parent / "images" / path.parent.name
    problems = Problems(path, "records")
    out: list[VQARecord] = []
    for i, obj in enumerate(items):
        where = f"{path}: record {i}"
        if not isinstance(obj, dict):
            problems.add(where, "is not a dict")
            continue
        n = len(problems.items)
        if "sent" in obj:  # *_vqa.pkl (LXMERT layout): img_id, sent, label {answer: score}, answer_type
            q = _text(obj, "sent", where, problems)
            label = obj.get("label")
            a = max(label, key=label.get) if isinstance(label, dict) and label else None
            if not isinstance(a, str) or not a.strip():
                problems.add(where, "key 'label' must map the answer to its score")
            img = _text(obj, "img_id", where, problems)
            raw_type = obj.get("answer_type")
            atype = "closed" if raw_type == "yes/no" else ("open" if raw_type == "other" else None)
            qid = obj.get("question_id", i)
        else:  # *_qa.pkl: image, question, answer
            q, a, img = _text(obj, "question", where, problems), _text(obj, "answer", where, problems, numbers=True), \
                _text(obj, "image", where, problems)
            atype, qid = None, i
        image = _image(root, f"{img}.jpg", where, problems, check_images) if img else None
        if len(problems.items) == n:
            a = a.strip()  # type: ignore[union-attr]
            out.append(VQARecord(q, a, image, atype or infer_answer_type(a),  # type: ignore[arg-type]
                                 source=f"{path}:{i}", id=str(qid)))
    problems.raise_if_any(len(items))
    return out


def _cache_dir() -> Path:
    base = os.environ.get("EDGEMED_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "edgemed")
    return Path(base) / "parquet-images"


def _parquet(path: Path, check_images: bool, cache: Path | None) -> list[VQARecord]:
    """A Hugging Face parquet copy (PathVQA, VQA-RAD): image {bytes, path}, question, answer."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow; pip install 'edgemed[datasets]'") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable parquet file ({e}); download it again") from e
    missing = [c for c in ("image", "question", "answer") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: parquet columns {table.column_names} lack {missing}; expected the Hugging Face "
                        "copy's image, question, answer")
    rows = table.to_pylist()
    folder = (cache or _cache_dir()) / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    problems = Problems(path, "records")
    out: list[VQARecord] = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        n = len(problems.items)
        q, a = _text(row, "question", where, problems), _text(row, "answer", where, problems, numbers=True)
        img = row.get("image")
        data = img.get("bytes") if isinstance(img, dict) else None
        if not isinstance(data, bytes | bytearray) or not data:
            problems.add(where, "column 'image' holds no image bytes")
        if len(problems.items) == n:
            image = None
            if check_images:
                image = folder / f"{hashlib.sha256(data).hexdigest()[:24]}.img"  # type: ignore[arg-type]
                if not image.is_file():
                    folder.mkdir(parents=True, exist_ok=True)
                    tmp = image.with_suffix(".tmp")
                    tmp.write_bytes(data)  # type: ignore[arg-type]
                    tmp.replace(image)
            out.append(VQARecord(q, a, image, infer_answer_type(a), source=f"{path}:{i}",  # type: ignore[arg-type]
                                 id=str(i)))
    problems.raise_if_any(len(rows))
    if not out:
        raise DataError(f"{path}: the parquet file has no rows")
    return out


def read_pathvqa(path: Path | str, image_root: Path | str | None = None, trust_pickle: bool = False,
                 check_images: bool = True, cache: Path | str | None = None) -> list[VQARecord]:
    """PathVQA: a release pickle (``*_qa.pkl``, ``*_vqa.pkl``; needs ``trust_pickle``) or a parquet copy."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give PathVQA's qas/<split>/*.pkl or a parquet copy")
    if path.suffix.lower() == ".parquet":
        return _parquet(path, check_images, Path(cache) if cache else None)
    return _pathvqa_pkl(path, Path(image_root) if image_root else None, trust_pickle, check_images)


# ---------------------------------------------------------------- R2Gen (IU-Xray, MIMIC-CXR)
def read_r2gen(path: Path | str, image_root: Path | str | None = None, split: str | None = "test",
               check_images: bool = True, clean: bool = True) -> list[VQARecord]:
    """R2Gen's annotation.json (IU-Xray or MIMIC-CXR) as report records (task "report", the report as answer).

    Args:
        path: annotation.json.
        image_root: Folder ``image_path`` is relative to (default: ``images`` beside the file).
        split: "train", "val", "test", or None for all.
        check_images: Require the image files to exist.
        clean: Clean reports as R2Gen does (clean_report_iu_xray, or clean_report_mimic_cxr for records with
            ``study_id``).
    """
    from edgemed.report_scores import clean_report_iu_xray, clean_report_mimic_cxr

    path = Path(path)
    data = _load_json(path, "R2Gen annotation.json")
    if not isinstance(data, dict) or not any(k in data for k in SPLITS_R2GEN):
        raise DataError(f"{path}: expected R2Gen's annotation.json, an object with train/val/test lists")
    if split is not None and split not in SPLITS_R2GEN:
        raise DataError(f"unknown R2Gen split {split!r}; choose one of {', '.join(SPLITS_R2GEN)}")
    root = Path(image_root) if image_root else _first_dir(path.parent / "images", path.parent)
    problems = Problems(path, "records")
    out: list[VQARecord] = []
    total = 0
    for sp in (split,) if split else SPLITS_R2GEN:
        items = data.get(sp)
        if items is None:
            continue
        if not isinstance(items, list):
            problems.add(f"{path}: {sp!r}", "must be a list of studies")
            continue
        for i, obj in enumerate(items):
            total += 1
            where = f"{path}: {sp}[{i}]"
            if not isinstance(obj, dict):
                problems.add(where, "is not a JSON object")
                continue
            n = len(problems.items)
            sid = obj.get("id")
            if not isinstance(sid, str | int) or isinstance(sid, bool) or str(sid) == "":
                problems.add(where, "key 'id' must be the study id")
            report = _text(obj, "report", where, problems)
            paths = obj.get("image_path")
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
                problems.add(where, "key 'image_path' must be a non-empty list of image paths")
                paths = []
            images = [_image(root, p, where, problems, check_images) for p in paths]
            if len(problems.items) == n:
                mimic = "study_id" in obj
                text = (clean_report_mimic_cxr if mimic else clean_report_iu_xray)(report) if clean else report
                out.append(VQARecord(REPORT_PROMPT, text, images[0], "open", task=REPORT_TASK,  # type: ignore[arg-type]
                                     source=f"{path}:{sp}[{i}]", id=str(sid)))
    problems.raise_if_any(total)
    if not out:
        raise DataError(f"{path}: no studies in split {split!r}; choose another --split")
    return out


# ---------------------------------------------------------------- edgemed JSONL and dispatch
def read_jsonl(path: Path | str, image_root: Path | str | None = None) -> list[VQARecord]:
    """edgemed VQA JSONL, each record's id its ``id`` key (else its line number)."""
    path = Path(path)
    records = read_vqa_jsonl(path, image_root)
    lines = path.read_bytes().split(b"\n")
    out = []
    for r in records:
        lineno = int(r.source.rsplit(":", 1)[1])
        obj = json.loads(lines[lineno - 1].decode("utf-8-sig" if lineno == 1 else "utf-8"))
        rid = obj.get("id")
        out.append(replace(r, id=str(rid) if isinstance(rid, str | int) and not isinstance(rid, bool)
                           else str(lineno)))
    return out


def detect_format(path: Path | str) -> str:
    """The layout of ``path`` when it is unambiguous; a DataError asking for --format otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".pkl", ".parquet"):
        return "pathvqa"
    if suffix == ".json":
        data = _load_json(path, "data")
        if isinstance(data, dict) and any(k in data for k in SPLITS_R2GEN):
            return "r2gen"
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        if "image_name" in first:
            return "vqa-rad"
        if "img_name" in first:
            return "slake"
    raise DataError(f"{path}: cannot tell the data layout; pass --format (one of {', '.join(FORMATS)})")


def read_data(path: Path | str, fmt: str | None = None, *, image_root: Path | str | None = None,
              split: str | None = None, lang: str | None = "en", trust_pickle: bool = False,
              check_images: bool = True) -> list[VQARecord]:
    """Read any supported layout (see the module docstring); ``fmt`` None recognises it.

    Args:
        path: The data file.
        fmt: One of FORMATS, or None.
        image_root: Image folder, where the layout's default does not fit.
        split: VQA-RAD: train/test/all (default all); R2Gen: train/val/test (default test).
        lang: SLAKE's language filter (None: all).
        trust_pickle: Allow PathVQA's release pickles.
        check_images: Require the images to exist (scoring saved predictions does not need them).
    """
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} for --format; choose one of {', '.join(FORMATS)}")
    if fmt == "jsonl":
        return read_jsonl(path, image_root)
    if fmt == "vqa-rad":
        return read_vqa_rad(path, image_root, split, check_images)
    if fmt == "slake":
        return read_slake(path, image_root, lang, check_images)
    if fmt == "pathvqa":
        return read_pathvqa(path, image_root, trust_pickle, check_images)
    return read_r2gen(path, image_root, split or "test", check_images)


"""The bundled synthetic demo set: phantom chest radiographs with one-word VQA, captions and a text corpus.

Convention: the phantom radiographs follow the radiological display convention (as if viewing a PA film, the
patient's right lung is on the image's left), but every label and question in the demo set says "left" and
"right" meaning **the left or right half of the image**, and the question text says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemed.artifacts import atomic_dir, sha256_file
from edgemed.data.dispatch import dataset_sha256
from edgemed.errors import DataError

GENERATOR_VERSION = 2  # 2: reports.json (R2Gen layout) beside the VQA splits, which are unchanged
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


_NORMAL_REPORTS = ("The lungs are clear. No focal lesion is seen.",
                   "Both lung fields are clear. There is no lesion.",
                   "Clear lungs. No lesion.")
_LESION_REPORTS = ("There is a {size} lesion in the {side} lung. The {other} lung is clear.",
                   "A {size} {side} lung lesion is seen. The {other} lung is clear.",
                   "{Size} lesion in the {side} lung. No other lesion.")


def _report(rng: np.random.Generator, lesion: tuple[str, str] | None) -> str:
    """A short findings report of a phantom: what it shows (side and size), in one of a few phrasings."""
    if lesion is None:
        return _NORMAL_REPORTS[int(rng.integers(0, len(_NORMAL_REPORTS)))]
    side, size = lesion
    other = "right" if side == "left" else "left"
    text = _LESION_REPORTS[int(rng.integers(0, len(_LESION_REPORTS)))]
    return text.format(size=size, Size=size.capitalize(), side=side, other=other)


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
        abstracts (text corpus); and reports: ``reports.json``, a findings report per image in R2Gen's
        annotation.json layout (train/val/test as the VQA splits), for the report-generation task.
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
        reports: dict[str, list[dict[str, Any]]] = {}
        report_rng = np.random.default_rng([seed, 2])  # its own stream: the VQA splits keep version 1's bytes
        for split, n in splits.items():
            rows: list[dict[str, Any]] = []
            for i, lesion in enumerate(_labels(rng, n)):
                rel = f"images/{split}_{i:04d}.png"
                Image.fromarray(np.repeat(_phantom(rng, lesion)[..., None], 3, axis=2), "RGB").save(tmp / rel)
                rows += _questions(rng, rel, lesion)
                study = {"id": f"{split}_{i:04d}", "report": _report(report_rng, lesion),
                         "image_path": [rel[len("images/"):]], "split": _R2GEN_SPLIT[split]}
                reports.setdefault(_R2GEN_SPLIT[split], []).append(study)
                if split == "train":
                    captions.append(_vqa(rel, _Q_CAPTION, _caption(lesion), "open", "caption", CAPTION_SYSTEM))
            _write_jsonl(tmp / f"{split}.jsonl", rows)
            counts[split] = {"images": n, "records": len(rows)}
        _write_jsonl(tmp / "captions.jsonl", captions)
        counts["captions"] = {"images": n_train, "records": len(captions)}
        _write_jsonl(tmp / "abstracts.jsonl", (_abstract(rng, i) for i in range(24)))
        counts["abstracts"] = {"images": 0, "records": 24}
        # R2Gen's annotation.json layout (IU-Xray's, one view per study), images under images/ beside it; "records"
        # counts the train split, the one read_dataset reads by default
        (tmp / "reports.json").write_text(json.dumps(reports, indent=1) + "\n")
        counts["reports"] = {"images": sum(splits.values()), "records": n_train,
                             "studies": {k: len(v) for k, v in reports.items()}}
        names = [*splits, "captions", "abstracts", "reports"]
        info = {
            "edgemed_dataset": 1,
            "name": "edgemed-phantom-cxr",
            "generator": "edgemed.data.generate_demo_set",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "image_size": DEMO_SIZE,
            "convention": "left/right mean the left/right half of the image (not the patient's side)",
            "counts": counts,
            "sha256": {_file(k): sha256_file(tmp / _file(k)) for k in names},
            "dataset_sha256": {_file(k): dataset_sha256(tmp / _file(k)) for k in names},
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return {k: out / _file(k) for k in names}


_R2GEN_SPLIT = {"train": "train", "validation": "val", "test": "test"}


def _file(name: str) -> str:
    return "reports.json" if name == "reports" else f"{name}.jsonl"

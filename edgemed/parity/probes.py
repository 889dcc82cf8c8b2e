"""The probe set: the questions put to both runtimes, read from a JSONL file or drawn from the run's validation
split plus general medical prompts, and kept disjoint from the export's calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemed.artifacts import MANIFEST, read_manifest
from edgemed.errors import ParityError

GENERAL_PROMPTS = (
    "What are the typical radiographic signs of community-acquired pneumonia?",
    "List three causes of a unilateral pleural effusion.",
    "Explain the difference between a PA and an AP chest radiograph.",
    "What does a hyperintense lesion on a T2-weighted MRI of the brain usually indicate?",
    "Summarise the first-line management of a patient with suspected pulmonary embolism.",
    "What is the normal cardiothoracic ratio on a PA chest film, and why does it matter?",
    "Describe the Fleischner Society follow-up for a solid 7 mm pulmonary nodule in a low-risk patient.",
    "Which findings on a CT head scan suggest an acute ischaemic stroke?",
    "What is a pneumothorax and how does it appear on a chest radiograph?",
    "Name the lobes of the right lung.",
    "What is the role of contrast in abdominal CT?",
    "A 65-year-old smoker has haemoptysis and weight loss. What imaging would you request first?",
    "What is the difference between a transudate and an exudate?",
    "Which radiographic sign suggests a left lower lobe collapse?",
    "Give the Glasgow Coma Scale components.",
    "What are the ultrasound features of acute cholecystitis?",
    "Explain what a D-dimer test measures and when it is useful.",
    "What does the silhouette sign mean on a chest X-ray?",
    "List the ABCDE approach to reading a chest radiograph.",
    "What is the typical appearance of a subdural haematoma on CT?",
    "How is bone age assessed on a hand radiograph?",
    "Which MRI sequence is most sensitive for acute infarction?",
    "What are Kerley B lines?",
    "Describe the radiographic features of osteoarthritis of the knee.",
    "What does free air under the diaphragm indicate?",
    "Name two contraindications to MRI.",
    "What is the Hounsfield unit value of water?",
    "How does a tension pneumothorax differ from a simple pneumothorax?",
    "What are common causes of hilar lymphadenopathy?",
    "Explain the ALARA principle in radiology.",
    "What findings suggest small bowel obstruction on an abdominal radiograph?",
    "Describe the typical location and appearance of a meningioma on MRI.",
)


@dataclass(frozen=True)
class Probe:
    """One question put to both runtimes; ``image`` is a file path, an in-memory image, or None."""

    question: str
    image: Any = None
    system: str | None = None
    source: str = ""

    def load_image(self) -> Any:
        """The image, opened from its file where it is a path (None for a text probe)."""
        if self.image is None:
            return None
        if isinstance(self.image, str | Path):
            from edgemed.data import load_image

            return load_image(self.image)
        return self.image


def read_probes(path: Path | str) -> list[Probe]:
    """Read a probe JSONL file: one ``{"question": str, "image": path (optional), "system": str (optional)}``
    per line; image paths are relative to the file's folder.

    Raises:
        DataError: one line naming every bad line as file:line (at most three spelt out).
    """
    from edgemed.data import read_probes_jsonl  # the one JSONL validator (edgemed.data.records)

    return [Probe(r.question, r.image, r.system, r.source) for r in read_probes_jsonl(path)]


def _synthetic_images(n: int) -> list[Any]:
    """Deterministic grey test images (bright disc on a dark field), for image models with no validation images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:64, 0:64]
        cx, cy, r = 16 + 32 * (i % 2), 20 + 8 * i, 6 + 3 * i
        a = 30 + 150 * (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r) + rng.normal(0, 8, (64, 64))
        out.append(Image.fromarray(np.repeat(np.clip(a, 0, 255).astype(np.uint8)[..., None], 3, 2), "RGB"))
    return out


def run_manifest_of(reference: Path, adapter: Path | None) -> dict[str, Any] | None:
    """The run manifest behind the reference (the adapter's, or the merged model's parent run)."""
    for folder in (adapter, reference):
        if folder is None or not (Path(folder) / MANIFEST).is_file():
            continue
        m = read_manifest(folder)
        if m.get("kind") == "run":
            return m
        parent = (m.get("parent") or {}).get("path")
        if m.get("kind") == "model" and parent and (Path(parent) / MANIFEST).is_file():
            pm = read_manifest(parent)
            if pm.get("kind") == "run":
                return pm
    return None


def default_probes(reference: Path, adapter: Path | None, is_vision: bool, max_probes: int = 32) -> list[Probe]:
    """Half from the run's validation split(s) (when there is a run), the rest general medical prompts."""
    from edgemed.data import TextRecord, read_dataset

    picked: list[Probe] = []
    run = run_manifest_of(reference, adapter)
    specs = {s.get("name"): s.get("data") or {} for s in ((run or {}).get("recipe") or {}).get("stages") or []}
    for stage, info in ((run or {}).get("data") or {}).items():
        val = (info or {}).get("validation")
        if not val or not Path(val).is_file():
            continue
        spec = specs.get(stage, {})  # read as the run read it (format, image folder, images allowed outside it)
        for r in read_dataset(val, spec.get("format") or "auto", spec.get("image_root"),
                              bool(spec.get("allow_outside_images"))):
            if isinstance(r, TextRecord):
                words = r.text.split()
                picked.append(Probe("Continue this abstract: " + " ".join(words[:24]), None, None,
                                    f"{stage}:{r.source}"))
            elif r.image is None or is_vision:
                picked.append(Probe(r.question, r.image, r.system, r.source))
    # spread the picks over the file (a validation split often groups questions by image)
    n_val = min(len(picked), max_probes // 2 if picked else 0)
    if n_val:
        idx = np.linspace(0, len(picked) - 1, n_val).round().astype(int)
        picked = [picked[i] for i in dict.fromkeys(idx.tolist())]
    else:
        picked = []
    if is_vision and not any(p.image is not None for p in picked):
        n_img = max(1, min(4, max_probes // 4))
        questions = ("Describe the image.", "Is there an abnormality in this image?")
        picked += [Probe(questions[i % 2], im, None, f"synthetic image {i}")
                   for i, im in enumerate(_synthetic_images(n_img))]
    general = [Probe(q, None, None, f"general {i}") for i, q in enumerate(GENERAL_PROMPTS)]
    while len(picked) < max_probes and general:
        picked.append(general.pop(0))
    return picked[:max_probes]


def _probe_key(question: str, image: Any) -> tuple[str, str]:
    return question.strip(), str(Path(image).resolve()) if isinstance(image, str | Path) else ""


def disjoint_from_calibration(manifest: dict[str, Any], probes: list[Probe], given: bool
                              ) -> tuple[list[Probe], dict[str, Any] | None]:
    """Probes that the export's calibration data did not hold: a given probe file that overlaps is refused, default
    probes that overlap are dropped. Returns the probes and what the report says about it."""
    from edgemed.data import TextRecord, read_dataset

    cal = manifest.get("calibration")
    if not cal:
        return probes, None
    info = {"data": cal.get("data"), "data_sha256": cal.get("data_sha256"), "samples": cal.get("samples")}
    path = Path(cal.get("data") or "")
    if not path.is_file():
        return probes, info | {"disjoint": None, "note": "calibration data not at hand; overlap not checked"}
    seen = set()
    for r in read_dataset(path):
        seen.add(r.text.strip() if isinstance(r, TextRecord) else _probe_key(r.question, r.image))
    overlap = [p for p in probes if _probe_key(p.question, p.image) in seen or p.question.strip() in seen]
    if overlap and given:
        raise ParityError(f"{len(overlap)} of {len(probes)} probes also occur in the calibration data {path} (e.g. "
                          f"{overlap[0].source}: {overlap[0].question[:60]!r}); judge the export on held-out probes")
    kept = [p for p in probes if p not in overlap]
    if not kept:
        raise ParityError(f"every default probe occurs in the calibration data {path}; give held-out --probes")
    return kept, info | {"disjoint": True, "dropped": len(overlap)}

"""Data: VQA and text records, readers for edgemed's JSONL and for public medical VQA sets, image loading
(PNG, JPEG, DICOM) and the bundled synthetic demo set.

* ``records``: the records and the line models of each format (schemas there), and the one JSONL reader that
  reports every bad line of a file at once.
* ``readers``: edgemed's VQA, text and probe JSONL, and VQA-RAD and SLAKE as downloaded. The other public layouts
  (PathVQA, R2Gen, MEVF's VQA-RAD) are ``edgemed.datasets``.
* ``dispatch``: ``read_dataset`` for any of them, and ``dataset_sha256``.
* ``images``: ``load_image`` and ``load_image_bytes`` (DICOM through ``edgemed.dicom``).
* ``demo_set``: ``generate_demo_set``.
"""

from __future__ import annotations

from edgemed.data.demo_set import CAPTION_SYSTEM, DEMO_SIZE, DEMO_SYSTEM, GENERATOR_VERSION, generate_demo_set
from edgemed.data.dispatch import dataset_sha256, read_dataset
from edgemed.data.images import DEFAULT_MAX_PIXELS, DICOM_MIMES, IMAGE_MIMES, PIL_FORMATS, load_image, load_image_bytes
from edgemed.data.readers import (
    FORMATS,
    SLAKE_IMAGES,
    VQA_RAD_IMAGES,
    read_probes_jsonl,
    read_slake,
    read_text_jsonl,
    read_vqa_jsonl,
    read_vqa_rad,
)
from edgemed.data.records import (
    ANSWER_TYPES,
    MAX_LISTED,
    AnswerType,
    ProbeRecord,
    Problems,
    TextRecord,
    VQARecord,
    infer_answer_type,
)

__all__ = [
    "ANSWER_TYPES", "CAPTION_SYSTEM", "DEFAULT_MAX_PIXELS", "DEMO_SIZE", "DEMO_SYSTEM", "DICOM_MIMES", "FORMATS",
    "GENERATOR_VERSION", "IMAGE_MIMES", "MAX_LISTED", "PIL_FORMATS", "SLAKE_IMAGES", "VQA_RAD_IMAGES", "AnswerType",
    "ProbeRecord", "Problems", "TextRecord", "VQARecord", "dataset_sha256", "generate_demo_set", "infer_answer_type",
    "load_image", "load_image_bytes", "read_dataset", "read_probes_jsonl", "read_slake", "read_text_jsonl",
    "read_vqa_jsonl", "read_vqa_rad",
]

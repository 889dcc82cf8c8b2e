"""Data layer: JSONL and public-set readers, their error reports, image loading (PNG, JPEG, DICOM), the demo set."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemed.data import (
    TextRecord,
    VQARecord,
    dataset_sha256,
    generate_demo_set,
    infer_answer_type,
    load_image,
    load_image_bytes,
    read_dataset,
    read_slake,
    read_text_jsonl,
    read_vqa_jsonl,
    read_vqa_rad,
)
from edgemed.errors import ArtifactError, DataError


# ---------------------------------------------------------------- helpers
def png(path: Path, value: int = 128, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels but carries no image data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def write_dicom(path: Path, stored: np.ndarray | None, *, photometric: str = "MONOCHROME2",
                window: tuple | None = None, rescale: tuple[float, float] | None = None,
                rows_cols: tuple[int, int] | None = None, preamble: bool = True) -> Path:
    """A 16-bit unsigned single-frame DICOM; ``stored=None`` writes no PixelData element."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows_cols or stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if stored is not None:
        ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    if not preamble:
        path.write_bytes(path.read_bytes()[132:])
    return path


def grey(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    a = np.asarray(im)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0].astype(int)


# ---------------------------------------------------------------- VQA JSONL
def test_read_vqa_jsonl_reads_every_field(tmp_path):
    png(tmp_path / "img" / "a.png")
    f = write_lines(tmp_path / "d.jsonl", [
        {"image": "img/a.png", "question": "Is it?", "answer": "Yes", "system": "S", "role": "r", "task": "t"},
        "",
        {"image": None, "question": "Which side?", "answer": "left"},
        {"question": "Size?", "answer": "yes", "answer_type": "OPEN"},
    ])
    recs = read_vqa_jsonl(f)
    assert recs == [
        VQARecord("Is it?", "Yes", tmp_path / "img" / "a.png", "closed", "S", "r", "t", f"{f}:1"),
        VQARecord("Which side?", "left", None, "open", None, None, None, f"{f}:3"),
        VQARecord("Size?", "yes", None, "open", None, None, None, f"{f}:4"),
    ]


def test_read_vqa_jsonl_image_root(tmp_path):
    png(tmp_path / "elsewhere" / "a.png")
    f = write_lines(tmp_path / "d.jsonl", [{"image": "a.png", "question": "q", "answer": "no"}])
    with pytest.raises(DataError, match="a.png"):
        read_vqa_jsonl(f)
    assert read_vqa_jsonl(f, image_root=tmp_path / "elsewhere")[0].image == tmp_path / "elsewhere" / "a.png"


@pytest.mark.parametrize("answer,expected", [("yes", "closed"), ("No", "closed"), (" YES. ", "closed"),
                                             ("left", "open"), ("none", "open"), ("yes, small", "open")])
def test_infer_answer_type(answer, expected):
    assert infer_answer_type(answer) == expected


def test_vqa_jsonl_reports_all_bad_lines_together(tmp_path):
    png(tmp_path / "ok.png")
    f = write_lines(tmp_path / "bad.jsonl", [
        {"image": "ok.png", "question": "q", "answer": "yes"},        # 1 fine
        '{"question": "q", "answer": ',                               # 2 not JSON
        {"image": "ok.png", "answer": "yes"},                         # 3 no question
        {"image": "ok.png", "question": "q", "answer": 3},            # 4 answer not a string
        {"image": "missing/x.png", "question": "q", "answer": "no"},  # 5 image missing
        {"question": "q", "answer": "no", "answer_type": "multi"},    # 6 bad answer_type
        "[1, 2]",                                                     # 7 not an object
    ])
    with pytest.raises(DataError) as e:
        read_vqa_jsonl(f)
    msg = str(e.value)
    first, *rest = msg.splitlines()
    assert first.startswith(str(f)) and "6 problems in 7 lines" in first
    assert len(rest) == 6
    assert re.search(rf"{re.escape(str(f))}:2: not valid JSON .*column", msg)
    assert re.search(rf"{re.escape(str(f))}:3: missing key 'question'", msg)
    assert re.search(rf"{re.escape(str(f))}:4: key 'answer' must be a string, got number", msg)
    assert re.search(rf"{re.escape(str(f))}:5: image file .*missing/x.png does not exist", msg)
    assert re.search(rf"{re.escape(str(f))}:6: key 'answer_type' must be \"closed\" or \"open\"", msg)
    assert re.search(rf"{re.escape(str(f))}:7: is a JSON array", msg)
    assert f"{f}:1" not in msg


def test_many_bad_lines_are_listed_up_to_ten(tmp_path):
    f = write_lines(tmp_path / "bad.jsonl", ["{oops"] * 25)
    with pytest.raises(DataError) as e:
        read_vqa_jsonl(f)
    lines = str(e.value).splitlines()
    assert "25 problems in 25 lines" in lines[0]
    assert len(lines) == 1 + 10 + 1 and lines[-1].strip() == "... and 15 more"


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match="empty"):
        read_vqa_jsonl(f)
    with pytest.raises(DataError, match="empty"):
        read_text_jsonl(f)


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_vqa_jsonl(tmp_path / "nope.jsonl")


def test_vqa_jsonl_is_edgemeds_own_format_so_unknown_keys_fail(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [
        {"question": "q", "answer": "yes", "id": "q7"},                # 1 fine: id is part of the schema
        {"question": "q", "anwser": "yes"},                            # 2 misspelt key: named, answer missing
        {"question": "q", "answer": "yes", "id": [1]},                 # 3 id neither string nor number
        {"question": "q", "answer": "yes", "id": 4, "colour": "red"},  # 4 unknown key
    ])
    with pytest.raises(DataError) as e:
        read_vqa_jsonl(f)
    msg = str(e.value)
    assert "4 problems in 4 lines" in msg.splitlines()[0] and f"{f}:1" not in msg
    assert f"{f}:2: missing key 'answer'" in msg and f"{f}:2: unknown key 'anwser'; allowed: question, answer" in msg
    assert f"{f}:3: key 'id' must be a string or a number, got array" in msg
    assert f"{f}:4: unknown key 'colour'" in msg
    with pytest.raises(DataError, match="unknown key 'question'; allowed: text, title"):
        read_text_jsonl(write_lines(tmp_path / "t.jsonl", [{"text": "x", "question": "q"}]))


def test_a_bad_key_and_a_missing_image_on_one_line_are_both_named(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [{"image": "gone.png", "answer": "yes"}, {"question": "q", "answer": "no"}])
    with pytest.raises(DataError) as e:
        read_vqa_jsonl(f)
    msg = str(e.value)
    assert "2 problems in 2 lines" in msg and f"{f}:1: missing key 'question'" in msg
    assert re.search(rf"{re.escape(str(f))}:1: image file .*gone.png does not exist", msg)


def test_probe_file_reader(tmp_path):
    from edgemed.data import ProbeRecord, read_probes_jsonl

    png(tmp_path / "a.png")
    good = write_lines(tmp_path / "p.jsonl", [{"question": "Is it?", "image": "a.png", "system": "S"},
                                              {"question": "Why?", "answer": "a VQA file serves as probes"}])
    assert read_probes_jsonl(good) == [ProbeRecord("Is it?", tmp_path / "a.png", "S", f"{good}:1"),
                                       ProbeRecord("Why?", None, None, f"{good}:2")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\n{"question": 3}\nnot json\n{"question": "x", "image": "nope.png"}\n'
                   '{"question": "x", "colour": 1}\n')
    with pytest.raises(DataError) as e:
        read_probes_jsonl(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("bad probe file: ") and "(and 1 more)" in msg
    assert f"{bad}:2" in msg and f"{bad}:3" in msg and f"{bad}:4" in msg and f"{bad}:1" not in msg
    with pytest.raises(DataError, match="no such probe file"):
        read_probes_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no probes"):
        read_probes_jsonl(tmp_path / "blank.jsonl")


# ---------------------------------------------------------------- text JSONL
def test_read_text_jsonl(tmp_path):
    f = write_lines(tmp_path / "t.jsonl", [{"text": "body one", "title": "T1"}, {"text": "body two"}])
    assert read_text_jsonl(f) == [TextRecord("body one", f"{f}:1", "T1"), TextRecord("body two", f"{f}:2", None)]
    bad = write_lines(tmp_path / "bad.jsonl", [{"text": "ok"}, {"title": "no text"}, {"text": "x", "title": 5},
                                               {"text": ""}])
    with pytest.raises(DataError) as e:
        read_text_jsonl(bad)
    msg = str(e.value)
    assert "3 problems in 4 lines" in msg.splitlines()[0]
    assert f"{bad}:2: missing key 'text'" in msg
    assert f"{bad}:3: key 'title' must be a string" in msg
    assert f"{bad}:4: key 'text' is empty" in msg


# ---------------------------------------------------------------- public sets
def make_vqa_rad(root: Path) -> Path:
    images = root / "VQA_RAD Image Folder"
    png(images / "synpic1.jpg.png")
    png(images / "synpic2.png")
    items = [
        {"qid": 1, "image_name": "synpic1.jpg.png", "question": "Is there a mass?", "answer": "Yes",
         "answer_type": "CLOSED", "question_type": "PRES", "image_organ": "CHEST"},
        {"qid": 2, "image_name": "synpic2.png", "question": "How many lesions?", "answer": 2,
         "answer_type": "OPEN", "question_type": "COUNT", "image_organ": "HEAD"},
        {"qid": 3, "image_name": "synpic2.png", "question": "Is it normal?", "answer": "no ",
         "answer_type": "CLOSED ", "question_type": "ABN"},
    ]
    path = root / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(items, indent=1))
    return path


def test_read_vqa_rad(tmp_path):
    path = make_vqa_rad(tmp_path)
    images = tmp_path / "VQA_RAD Image Folder"
    recs = read_vqa_rad(path, images)
    assert [(r.question, r.answer, r.answer_type, r.task) for r in recs] == [
        ("Is there a mass?", "Yes", "closed", "pres"), ("How many lesions?", "2", "open", "count"),
        ("Is it normal?", "no", "closed", "abn")]
    assert recs[0].image == images / "synpic1.jpg.png" and recs[1].source == f"{path}:2"
    assert read_dataset(path) == recs  # auto: a JSON list with image_name, default image folder


def test_read_vqa_rad_missing_image_and_key(tmp_path):
    path = make_vqa_rad(tmp_path)
    items = json.loads(path.read_text())
    items[1]["image_name"] = "gone.png"
    del items[2]["answer"]
    path.write_text(json.dumps(items))
    with pytest.raises(DataError) as e:
        read_vqa_rad(path, tmp_path / "VQA_RAD Image Folder")
    msg = str(e.value)
    assert msg.splitlines()[0].startswith(f"{path}: 2 problems in 3 records")
    assert "record 2: image file" in msg and "gone.png does not exist" in msg
    assert "record 3: missing key 'answer'" in msg


def make_slake(root: Path) -> Path:
    png(root / "imgs" / "xmlab1" / "source.jpg")
    items = [
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Is the lung healthy?", "answer": "No",
         "q_lang": "en", "answer_type": "CLOSED", "content_type": "Abnormality", "modality": "X-Ray"},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "肺部健康吗?", "answer": "不",
         "q_lang": "zh", "answer_type": "CLOSED", "content_type": "Abnormality"},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Where is the abnormality?",
         "answer": "Left Lung", "q_lang": "en", "answer_type": "OPEN", "content_type": "Position"},
    ]
    path = root / "train.json"
    path.write_text(json.dumps(items, ensure_ascii=False))
    return path


def test_read_slake_language_filter(tmp_path):
    path = make_slake(tmp_path)
    imgs = tmp_path / "imgs"
    en = read_slake(path, imgs)
    assert [(r.question, r.answer, r.answer_type, r.task) for r in en] == [
        ("Is the lung healthy?", "No", "closed", "abnormality"),
        ("Where is the abnormality?", "Left Lung", "open", "position")]
    assert en[0].image == imgs / "xmlab1" / "source.jpg"
    assert [r.answer for r in read_slake(path, imgs, lang="zh")] == ["不"]
    assert len(read_slake(path, imgs, lang=None)) == 3
    assert read_dataset(path) == en  # auto: img_name -> SLAKE, default folder imgs/
    with pytest.raises(DataError, match="no records left"):
        read_slake(path, imgs, lang="fr")


def test_read_dataset_dispatch(tmp_path):
    png(tmp_path / "a.png")
    vqa = write_lines(tmp_path / "v.jsonl", [{"image": "a.png", "question": "q", "answer": "yes"}])
    text = write_lines(tmp_path / "t.jsonl", [{"text": "abc"}])
    other = write_lines(tmp_path / "o.jsonl", [{"prompt": "abc"}])
    assert isinstance(read_dataset(vqa)[0], VQARecord)
    assert isinstance(read_dataset(text)[0], TextRecord)
    assert isinstance(read_dataset(text, fmt="text")[0], TextRecord)
    with pytest.raises(DataError, match="neither 'question'"):
        read_dataset(other)
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        read_dataset(vqa, fmt="csv")
    with pytest.raises(DataError, match="missing key 'question'"):
        read_dataset(text, fmt="vqa")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="suffix"):
        read_dataset(tmp_path / "x.csv")


# ---------------------------------------------------------------- images: PNG and JPEG
def test_load_png_and_jpeg(tmp_path):
    a = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    Image.fromarray(a, "L").save(tmp_path / "g.png")
    im = load_image(tmp_path / "g.png")
    assert im.size == (64, 64) and (grey(im) == a).all()
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.jpg", quality=95)
    im = load_image(tmp_path / "c.jpg")
    arr = np.asarray(im).astype(int)
    assert im.mode == "RGB" and im.size == (24, 16) and abs(arr[..., 0].mean() - 200) < 3 and arr[..., 1].max() < 8
    # 16-bit grey PNG: stretched min..max to 8 bit, not clipped at 255
    a16 = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert grey(load_image(tmp_path / "g16.png")).tolist() == [[0, 64], [128, 255]]


def test_load_image_bytes_png(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (5, 7), (10, 20, 30)).save(buf, "PNG")
    im = load_image_bytes(buf.getvalue(), "image/png")
    assert im.size == (5, 7) and im.getpixel((2, 3)) == (10, 20, 30)
    assert load_image_bytes(buf.getvalue(), None).size == (5, 7)
    with pytest.raises(DataError, match="unsupported media type 'image/gif'"):
        load_image_bytes(buf.getvalue(), "image/gif")
    with pytest.raises(DataError, match="no bytes"):
        load_image_bytes(b"", "image/png")


def test_missing_and_unknown_image(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: no such image file"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "x.png").write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"x\.png: not a PNG, JPEG or DICOM image"):
        load_image(tmp_path / "x.png")


def test_truncated_png_is_reported(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: cannot decode the PNG image .*corrupt or truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_image_bytes(data[: len(data) // 2], "image/png")


@pytest.mark.parametrize("width,height", [(8000, 8000), (100_000, 100_000)])
def test_huge_declared_size_refused_before_decoding(tmp_path, width, height):
    # The file has no pixel data: had it been decoded, the error would be "truncated", not the pixel limit.
    f = tmp_path / "bomb.png"
    f.write_bytes(png_header_only(width, height))
    with pytest.raises(DataError, match=r"bomb\.png: .*(over the limit|exceeds limit).*decompression bomb"):
        load_image(f)
    with pytest.raises(DataError, match="decompression bomb"):
        load_image_bytes(f.read_bytes(), "image/png")


def test_max_pixels_parameter(tmp_path):
    f = png(tmp_path / "a.png", size=(64, 64))
    assert load_image(f, max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(DataError, match=r"64x64 = 4,096 pixels, over the limit of 4,095"):
        load_image(f, max_pixels=64 * 64 - 1)


# ---------------------------------------------------------------- images: DICOM
# Window (PS3.3 C.11.2.1.2.1) with c=41, w=256: x <= -87 -> 0, x > 168 -> 255, else y = x + 87,
# where x = 2 * stored - 1024 (RescaleSlope 2, RescaleIntercept -1024).
STORED = np.array([[0, 469, 512, 550], [562, 596, 597, 4000]], dtype=np.uint16)
WINDOWED = [[0, 1, 87, 163], [187, 255, 255, 255]]


def test_dicom_rescale_then_window(tmp_path):
    f = write_dicom(tmp_path / "ct", STORED, window=(41, 256), rescale=(2, -1024))
    assert f.suffix == ""  # detected by the DICM marker, not the name
    im = load_image(f)
    assert im.size == (4, 2) and grey(im).tolist() == WINDOWED


def test_dicom_multivalued_window_uses_first(tmp_path):
    f = write_dicom(tmp_path / "ct.dcm", STORED, window=([41, 500], [256, 2000]), rescale=(2, -1024))
    assert grey(load_image(f)).tolist() == WINDOWED


def test_dicom_monochrome1_is_inverted(tmp_path):
    f = write_dicom(tmp_path / "cr.dcm", STORED, window=(41, 256), rescale=(2, -1024), photometric="MONOCHROME1")
    assert grey(load_image(f)).tolist() == [[255 - v for v in row] for row in WINDOWED]


def test_dicom_without_window_uses_min_max(tmp_path):
    f = write_dicom(tmp_path / "mr.dcm", np.array([[0, 200], [600, 1000]], dtype=np.uint16))
    assert grey(load_image(f)).tolist() == [[0, 51], [153, 255]]


def test_dicom_without_preamble_detected_by_extension_and_bytes(tmp_path):
    f = write_dicom(tmp_path / "ct.dcm", STORED, window=(41, 256), rescale=(2, -1024), preamble=False)
    assert f.read_bytes()[128:132] != b"DICM"
    assert grey(load_image(f)).tolist() == WINDOWED
    g = write_dicom(tmp_path / "ct2", STORED, window=(41, 256), rescale=(2, -1024))
    assert grey(load_image_bytes(g.read_bytes(), None)).tolist() == WINDOWED
    assert grey(load_image_bytes(f.read_bytes(), "application/dicom")).tolist() == WINDOWED


def test_dicom_without_pixel_data(tmp_path):
    f = write_dicom(tmp_path / "sr.dcm", None, rows_cols=(4, 4))
    with pytest.raises(DataError, match=r"sr\.dcm: DICOM file has no pixel data.*give an image instance"):
        load_image(f)


def test_dicom_huge_rows_columns_refused_before_decoding(tmp_path):
    # 60000 x 60000 declared, 8 pixels stored: decoding would fail on length, so this must be the pixel check.
    f = write_dicom(tmp_path / "big.dcm", STORED, rows_cols=(60000, 60000))
    with pytest.raises(DataError, match=r"big\.dcm: declares 60000x60000 = 3,600,000,000 pixels, over the limit"):
        load_image(f)


# ---------------------------------------------------------------- synthetic demo set
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return generate_demo_set(tmp_path_factory.mktemp("demo") / "set", seed=0)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def image_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "images").iterdir())}


def test_demo_is_deterministic(tmp_path):
    a = generate_demo_set(tmp_path / "a", seed=3, n_train=20, n_val=4, n_test=6)
    b = generate_demo_set(tmp_path / "b", seed=3, n_train=20, n_val=4, n_test=6)
    c = generate_demo_set(tmp_path / "c", seed=4, n_train=20, n_val=4, n_test=6)
    assert set(a) == {"train", "validation", "test", "captions", "abstracts", "reports"}
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes()
    assert image_hashes(tmp_path / "a") == image_hashes(tmp_path / "b")
    assert (tmp_path / "a" / "dataset.json").read_bytes() == (tmp_path / "b" / "dataset.json").read_bytes()
    assert len(image_hashes(tmp_path / "a")) == 30
    assert image_hashes(tmp_path / "a") != image_hashes(tmp_path / "c")
    assert a["train"].read_bytes() != c["train"].read_bytes()


def test_demo_refuses_existing_folder(tmp_path):
    generate_demo_set(tmp_path / "d", n_train=4, n_val=2, n_test=2)
    with pytest.raises(ArtifactError, match="already exists"):
        generate_demo_set(tmp_path / "d", n_train=4, n_val=2, n_test=2)
    generate_demo_set(tmp_path / "d", seed=1, n_train=6, n_val=2, n_test=2, overwrite=True)
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["counts"]["train"]["images"] == 6
    with pytest.raises(DataError, match="n_val must be an integer >= 2"):
        generate_demo_set(tmp_path / "e", n_val=0)


def test_demo_manifest_and_readers(demo):
    root = demo["train"].parent
    info = json.loads((root / "dataset.json").read_text())
    assert info["seed"] == 0 and info["generator_version"] >= 1
    for k, p in demo.items():
        assert info["sha256"][p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert info["dataset_sha256"][p.name] == dataset_sha256(p)
        assert info["counts"][k]["records"] == len(read_dataset(p))
    assert {k: info["counts"][k]["images"] for k in ("train", "validation", "test")} == {
        "train": 480, "validation": 48, "test": 96}
    abstracts = read_dataset(demo["abstracts"])
    assert len(abstracts) == 24 and all(isinstance(r, TextRecord) and r.title and len(r.text) > 200
                                        for r in abstracts)
    assert len({r.text for r in abstracts}) == 24
    caps = read_vqa_jsonl(demo["captions"])
    train_images = {r.image for r in read_vqa_jsonl(demo["train"])}
    assert {r.image for r in caps} == train_images and len(caps) == len(train_images)
    assert all(r.question == "Describe the image." and "radiograph" in r.answer for r in caps)


def test_demo_splits_disjoint_and_answers_one_word(demo):
    images = {}
    for split in ("train", "validation", "test"):
        recs = read_vqa_jsonl(demo[split])
        images[split] = {r.image for r in recs}
        for r in recs:
            assert re.fullmatch(r"[a-z]+", r.answer), r
            assert r.answer_type == ("closed" if r.answer in ("yes", "no") else "open")
            assert r.system and "one word" in r.system and r.task
            if "left" in r.question or "side" in r.question:
                assert "image" in r.question  # left/right are the image's halves, and the question says so
    assert not images["train"] & images["validation"]
    assert not images["train"] & images["test"]
    assert not images["validation"] & images["test"]
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for s in images.values() for p in s]
    assert len(set(hashes)) == len(hashes)  # no two image files are identical either


def labels_by_image(path: Path) -> dict[Path, dict[str, str]]:
    out: dict[Path, dict[str, str]] = {}
    for r in read_vqa_jsonl(path):
        out.setdefault(r.image, {})[r.task if r.answer_type == "open" or r.task == "presence" else "left?"] = r.answer
    return out


def test_demo_label_balance(demo):
    labels = labels_by_image(demo["train"])
    n = len(labels)
    lesion = [v for v in labels.values() if v["presence"] == "yes"]
    assert abs(len(lesion) / n - 0.5) < 0.05
    assert all(v["abnormality"] == "none" for v in labels.values() if v["presence"] == "no")
    for task, values in (("side", ("left", "right")), ("size", ("small", "large"))):
        counts = [sum(v[task] == x for v in lesion) for x in values]
        assert min(counts) / len(lesion) > 0.4, (task, counts)
    assert all(v["left?"] == ("yes" if v["side"] == "left" else "no") for v in lesion)
    closed = [r.answer for r in read_vqa_jsonl(demo["train"]) if r.answer_type == "closed"]
    assert 0.4 < closed.count("yes") / len(closed) < 0.6


def test_demo_labels_are_visible_in_pixels(demo):
    """Bright pixels sit only in the labelled half, large lesions have many more than small ones, and the
    labelled half is brighter on average than the same half of normal images."""
    labels = labels_by_image(demo["test"])
    bright: dict[str, list[int]] = {"small": [], "large": []}
    half_mean: dict[str, list[float]] = {"lesion": [], "normal": []}
    for image, v in labels.items():
        g = grey(load_image(image))
        left, right = g[:, :32], g[:, 32:]
        if v["presence"] == "no":
            assert (g > 200).sum() == 0
            half_mean["normal"] += [left.mean(), right.mean()]
            continue
        mine, other = (left, right) if v["side"] == "left" else (right, left)
        assert (other > 200).sum() == 0
        bright[v["size"]].append(int((mine > 200).sum()))
        half_mean["lesion"].append(mine.mean())
    assert min(bright["small"]) >= 10
    assert min(bright["large"]) > 3 * max(bright["small"])
    assert np.mean(half_mean["lesion"]) > np.mean(half_mean["normal"]) + 3


def test_dataset_sha256_covers_images(demo, tmp_path):
    src = demo["validation"].parent
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert dataset_sha256(copy / "validation.jsonl") == dataset_sha256(demo["validation"])  # location-free
    first = read_vqa_jsonl(copy / "validation.jsonl")[0].image
    Image.new("RGB", (64, 64)).save(first)
    assert dataset_sha256(copy / "validation.jsonl") != dataset_sha256(demo["validation"])

"""Public-layout readers on small files written in exactly the downloaded layouts: VQA-RAD (OSF and MEVF), SLAKE,
PathVQA (release pickles, parquet copies), R2Gen annotation.json (IU-Xray, MIMIC-CXR)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemed.data import load_image
from edgemed.datasets import REPORT_TASK, detect_format, read_data, read_pathvqa, read_r2gen, read_slake, read_vqa_rad
from edgemed.errors import DataError


def png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def vqa_rad_osf(folder: Path) -> Path:
    """Three records of ``VQA_RAD Dataset Public.json`` with the OSF release's keys."""
    png(folder / "VQA_RAD Image Folder" / "synpic54610.jpg")
    recs = [
        {"qid": 1, "phrase_type": "freeform", "qid_linked_id": "03f451ca", "image_case_url": "https://example",
         "image_name": "synpic54610.jpg", "image_organ": "HEAD", "evaluation": "not evaluated",
         "question": "Are regions of the brain infarcted?", "question_rephrase": "NULL", "question_relation": "NULL",
         "question_frame": "NULL", "question_type": "PRES", "answer": "Yes", "answer_type": "CLOSED"},
        {"qid": 2, "phrase_type": "test_freeform", "image_name": "synpic54610.jpg", "image_organ": "HEAD",
         "question": "How many lesions?", "question_type": "COUNT", "answer": 2, "answer_type": "OPEN"},
        {"qid": 3, "phrase_type": "test_para", "image_name": "synpic54610.jpg", "image_organ": "HEAD",
         "question": "Is this normal?", "question_type": "ABN", "answer": "no", "answer_type": "CLOSED "},
    ]
    path = folder / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(recs))
    return path


def test_vqa_rad_osf_and_test_split(tmp_path):
    path = vqa_rad_osf(tmp_path)
    assert detect_format(path) == "vqa-rad"
    every = read_vqa_rad(path)
    assert [r.id for r in every] == ["1", "2", "3"]
    test = read_data(path, "vqa-rad", split="test")
    assert [(r.id, r.answer, r.answer_type, r.task) for r in test] == [("2", "2", "open", "count"),
                                                                       ("3", "no", "closed", "abn")]
    assert test[0].image == (tmp_path / "VQA_RAD Image Folder" / "synpic54610.jpg").resolve()
    assert [r.id for r in read_vqa_rad(path, split="train")] == ["1"]


def test_vqa_rad_mevf_layout(tmp_path):
    png(tmp_path / "images" / "synpic100.jpg")
    recs = [{"qid": 10, "image_name": "synpic100.jpg", "image_organ": "CHEST", "answer": "Left",
             "answer_type": "OPEN", "question_type": "POS", "question": "Which side?", "phrase_type": "test_freeform"}]
    (tmp_path / "testset.json").write_text(json.dumps(recs))
    r = read_data(tmp_path / "testset.json", split="test")
    assert r[0].id == "10" and r[0].image == (tmp_path / "images" / "synpic100.jpg").resolve()
    with pytest.raises(DataError, match="no phrase_type matches split 'train'"):
        read_vqa_rad(tmp_path / "testset.json", split="train")


def test_vqa_rad_reports_every_bad_record_at_once(tmp_path):
    png(tmp_path / "images" / "a.jpg")
    recs = [{"qid": 1, "image_name": "a.jpg", "question": "", "answer": "yes"},
            {"qid": 2, "image_name": "missing.jpg", "question": "q", "answer": "yes"},
            {"image_name": "../../etc/passwd", "question": "q", "answer": "yes"},
            "not a record"]
    (tmp_path / "trainset.json").write_text(json.dumps(recs))
    with pytest.raises(DataError) as e:
        read_vqa_rad(tmp_path / "trainset.json")
    msg = str(e.value)
    assert "5 problems in 4 records" in msg and "record 1: key 'question'" in msg
    assert "record 2: image file" in msg and "record 3: key 'qid'" in msg and "leaves the image folder" in msg
    assert "record 4: is not a JSON object" in msg


def test_slake_english_filter(tmp_path):
    png(tmp_path / "imgs" / "xmlab102" / "source.jpg")
    recs = [{"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "Which organ?", "answer": "Lung",
             "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
             "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 11934},
            {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "哪个器官?", "answer": "肺",
             "q_lang": "zh", "answer_type": "OPEN", "content_type": "Organ", "qid": 11935}]
    (tmp_path / "test.json").write_text(json.dumps(recs, ensure_ascii=False))
    assert detect_format(tmp_path / "test.json") == "slake"
    en = read_slake(tmp_path / "test.json")
    assert [(r.id, r.answer, r.task) for r in en] == [("11934", "Lung", "organ")]
    assert [r.id for r in read_slake(tmp_path / "test.json", lang=None)] == ["11934", "11935"]


def pathvqa_release(root: Path) -> tuple[Path, Path]:
    """qas/test/test_qa.pkl and test_vqa.pkl as the PathVQA release writes them, with images/test/*.jpg."""
    png(root / "images" / "test" / "test_0000.jpg")
    png(root / "images" / "test" / "test_0001.jpg")
    qa = [{"image": "test_0000", "question": "Is this a neoplasm?", "answer": "yes"},
          {"image": "test_0001", "question": "What is present?", "answer": "necrosis"}]
    vqa = [{"img_id": "test_0000", "sent": "Is this a neoplasm?", "label": {"yes": 1}, "answer_type": "yes/no",
            "question_id": 900000, "question_type": "is"},
           {"img_id": "test_0001", "sent": "What is present?", "label": {"necrosis": 1}, "answer_type": "other",
            "question_id": 900001, "question_type": "what"}]
    (root / "qas" / "test").mkdir(parents=True)
    a, b = root / "qas" / "test" / "test_qa.pkl", root / "qas" / "test" / "test_vqa.pkl"
    a.write_bytes(pickle.dumps(qa, protocol=2))
    b.write_bytes(pickle.dumps(vqa, protocol=4))
    return a, b


def test_pathvqa_pickles_only_when_trusted(tmp_path):
    qa, vqa = pathvqa_release(tmp_path)
    with pytest.raises(DataError, match="is a Python pickle.*can run code.*--trust-pickle"):
        read_data(qa)
    r = read_pathvqa(qa, trust_pickle=True)
    assert [(x.id, x.answer, x.answer_type) for x in r] == [("0", "yes", "closed"), ("1", "necrosis", "open")]
    assert r[0].image == (tmp_path / "images" / "test" / "test_0000.jpg").resolve()
    v = read_pathvqa(vqa, trust_pickle=True)
    assert [(x.id, x.question, x.answer, x.answer_type) for x in v] == [
        ("900000", "Is this a neoplasm?", "yes", "closed"), ("900001", "What is present?", "necrosis", "open")]


class Boom:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pathvqa_pickle_with_objects_is_refused_even_when_trusted(tmp_path, capsys):
    (tmp_path / "qas" / "test").mkdir(parents=True)
    evil = tmp_path / "qas" / "test" / "test_qa.pkl"
    evil.write_bytes(pickle.dumps([{"image": "x", "question": "q", "answer": Boom()}]))
    with pytest.raises(DataError, match="asks for builtins.print"):
        read_pathvqa(evil, trust_pickle=True)
    assert "this ran" not in capsys.readouterr().out


def test_pathvqa_parquet_copy(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": png_bytes(10), "path": None}, {"bytes": png_bytes(200), "path": None}],
                      "question": ["Is there necrosis?", "What organ?"], "answer": ["no", "liver"]})
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(table, path)
    assert detect_format(path) == "pathvqa"
    recs = read_pathvqa(path, cache=tmp_path / "c")
    assert [(r.id, r.answer, r.answer_type) for r in recs] == [("0", "no", "closed"), ("1", "liver", "open")]
    assert np.asarray(load_image(recs[1].image))[0, 0, 0] == 200
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["q"]}), bad)
    with pytest.raises(DataError, match="lack \\['image', 'answer'\\]"):
        read_pathvqa(bad)


def test_r2gen_iu_xray_and_mimic(tmp_path):
    png(tmp_path / "images" / "CXR2384_IM-0942" / "0.png")
    png(tmp_path / "images" / "CXR2384_IM-0942" / "1.png")
    ann = {"train": [], "val": [],
           "test": [{"id": "CXR2384_IM-0942", "report": "The heart is normal in size. 2. No effusion..",
                     "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "test"}]}
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(ann))
    assert detect_format(path) == "r2gen"
    (r,) = read_data(path)
    assert r.id == "CXR2384_IM-0942" and r.task == REPORT_TASK and r.answer_type == "open"
    assert r.answer == "the heart is normal in size . no effusion ."
    assert r.image == (tmp_path / "images" / "CXR2384_IM-0942" / "0.png").resolve()  # the first (frontal) view
    mimic = {"test": [{"id": "02aa804e", "study_id": 50414267, "subject_id": 10000032,
                       "report": "___ year old.\n No acute process.", "image_path": ["p10/a.jpg"], "split": "test"}]}
    png(tmp_path / "m" / "images" / "p10" / "a.jpg")
    (tmp_path / "m" / "annotation.json").write_text(json.dumps(mimic))
    (m,) = read_r2gen(tmp_path / "m" / "annotation.json")
    assert m.answer == " year old . no acute process ."  # R2Gen strips before it deletes "_"
    with pytest.raises(DataError, match="no studies in split 'train'"):
        read_r2gen(path, split="train")
    bad = {"test": [{"id": "x", "report": "", "image_path": []}, {"report": "r", "image_path": ["nope.png"]}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError) as e:
        read_r2gen(tmp_path / "bad.json")
    assert "test[0]: key 'report'" in str(e.value) and "test[0]: key 'image_path'" in str(e.value)
    assert "test[1]: key 'id'" in str(e.value) and "test[1]: image file" in str(e.value)


def test_jsonl_ids_and_unknown_layout(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "q7", "image": "a.png", "question": "q", "answer": "yes"})
                                      + "\n" + json.dumps({"question": "q2", "answer": "left"}) + "\n")
    assert [r.id for r in read_data(tmp_path / "t.jsonl")] == ["q7", "2"]
    (tmp_path / "x.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(DataError, match="cannot tell the data layout; pass --format"):
        read_data(tmp_path / "x.json")
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        read_data(tmp_path / "x.json", "csv")

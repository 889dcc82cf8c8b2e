"""VQA scoring (normalisation, yes/no synonyms, exact match, token recall), the same prompts on every runtime,
and the retention table."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import write_vqa

from edgemed.archs import REGISTRY
from edgemed.artifacts import write_manifest
from edgemed.cli import main
from edgemed.data import VQARecord, read_vqa_jsonl
from edgemed.errors import ParityError
from edgemed.evaluate import evaluate, evaluate_many, normalize, rescore, score, yes_no


def test_normalize_and_yes_no():
    assert normalize("  The Left   lung.") == "left lung"
    assert normalize("An X-ray, a CT!") == "x ray ct"
    for y in ("Yes.", "yeah", "True", "Present in the left lung", "positive"):
        assert yes_no(y) == "yes", y
    for n in ("No", "None.", "absent", "False", "negative finding", "not seen"):
        assert yes_no(n) == "no", n
    assert yes_no("normal") is None and yes_no("") is None and yes_no("maybe yes") is None


def test_score_closed_and_open():
    assert score("Yes, there is a lesion.", "yes", "closed")["correct"] == 1.0
    assert score("None", "no", "closed")["correct"] == 1.0
    assert score("yes", "no", "closed")["correct"] == 0.0
    assert score("Left.", "left", "closed")["correct"] == 1.0  # a fixed-choice closed answer
    assert score("right", "left", "closed")["correct"] == 0.0
    s = score("The large lesion", "large", "open")
    assert s["exact"] == 0.0 and s["recall"] == 1.0 and s["score"] == 0.0
    s = score("left lung", "left upper lobe", "open")
    assert s["exact"] == 0.0 and s["recall"] == pytest.approx(1 / 3)
    assert score("Small.", "small", "open")["exact"] == 1.0


class Scripted:
    """A backend that answers from a script: the protocol's render/generate, no model."""

    name, is_vision = "scripted", True
    arch = REGISTRY["llava"]  # an image family (its DICOM rendering is read)

    def __init__(self, answers: dict[str, str]):
        self.answers, self.prompts = answers, []

    def render(self, question, *, image=False, system=None):
        return f"[{system}|{'img' if image else ''}] {question}"

    def generate(self, prompt, image=None, params=None):
        self.prompts.append((prompt, image is not None, params.max_tokens, params.temperature))
        yield from self.answers[prompt.split("] ", 1)[1]].split(" ")  # streamed in pieces

    def close(self):
        pass


def test_evaluate_scores_by_type_and_task():
    recs = [VQARecord("q1", "yes", None, "closed", "sys", task="presence"),
            VQARecord("q2", "no", None, "closed", task="presence"),
            VQARecord("q3", "left", None, "open", task="side"),
            VQARecord("q4", "small lesion", None, "open", task="size")]
    b = Scripted({"q1": "Yes.", "q2": "yes", "q3": "left", "q4": "lesion"})
    res = evaluate(b, recs)
    o = res["overall"]
    assert o["n"] == 4 and o["closed"]["accuracy"] == 0.5 and o["open"]["exact"] == 0.5
    assert o["open"]["recall"] == pytest.approx((1 + 0.5) / 2)
    assert o["score"] == pytest.approx(2 / 4)
    assert res["by_task"]["presence"]["score"] == 0.5 and res["by_task"]["side"]["score"] == 1.0
    assert b.prompts[0] == ("[sys|] q1", False, 12, 0.0)  # rendered by the backend, greedy, short budget
    assert [p["prediction"] for p in res["predictions"]] == ["Yes.", "yes", "left", "lesion"]


def test_retention_table_against_parent(tiny_model, tmp_path):
    ref = tiny_model("llava")
    data = write_vqa(tmp_path / "data", n=3, image=True)
    model = shutil.copytree(ref, tmp_path / "model")
    write_manifest(model, "model")
    res = evaluate_many([ref, model], data, report=tmp_path / "eval.json")
    assert [r["label"] for r in res.results] == [ref.name, "model"]
    a, b = res.results
    assert a["overall"]["n"] == 3 and a["overall"]["score"] == b["overall"]["score"]
    assert b["delta_points"] == 0.0 and b["vs"] == ref.name
    assert [p["prediction"] for p in a["predictions"]] == [p["prediction"] for p in b["predictions"]]
    rep = json.loads((tmp_path / "eval.json").read_text())
    assert len(rep["results"][0]["predictions"]) == 3
    assert b["retention"]["lost"] == 0 and b["retention"]["gained"] == 0 and b["retention"]["mcnemar_p"] == 1.0
    assert b["retention"]["ci_low"] == 0.0 == b["retention"]["ci_high"]
    table = res.table()
    assert "closed" in table and "95% CI" in table and "McNemar p" in table and "-0/+0" in table


def test_eval_cli_errors(tiny_model, tmp_path):
    text = tmp_path / "corpus.jsonl"
    text.write_text('{"text": "a document"}\n')
    r = CliRunner().invoke(main, ["eval", str(tiny_model("llama")), "--data", str(text)])
    assert r.exit_code == 2 and "text corpus" in r.output
    with pytest.raises(ParityError, match="--limit"):
        evaluate_many([tiny_model("llama")], write_vqa(tmp_path / "d", n=2, image=False), limit=0)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_same_prompts_on_pytorch_and_gguf(tiny_model, tmp_path):
    from edgemed.export.gguf import export_gguf

    ref = tiny_model("llama")
    data = write_vqa(tmp_path / "data", n=4, image=False)
    gguf = export_gguf(ref, ["f32", "q8_0"], tmp_path / "gguf")
    res = evaluate_many([ref, gguf], data)
    labels = [r["label"] for r in res.results]
    assert labels == [ref.name, "gguf f32", "gguf q8_0"]
    torch_answers = [p["prediction"] for p in res.results[0]["predictions"]]
    # f32 GGUF is the same model: the greedy answers are the same text
    assert [p["prediction"] for p in res.results[1]["predictions"]] == torch_answers
    assert res.results[1]["delta_points"] == 0.0
    records = read_vqa_jsonl(data)
    assert all(r["overall"]["n"] == len(records) for r in res.results)


def test_evaluate_under_each_protocol():
    recs = [VQARecord("q1", "no", None, "closed"), VQARecord("q2", "the liver", None, "open")]
    b = Scripted({"q1": "normal", "q2": "Liver."})
    by = {p: evaluate(b, recs, protocol=p)["overall"] for p in ("edgemed", "pefomed", "llava-med", "medgemma")}
    # "normal" is not "no" under any protocol (llava-med's substring test would have said it was)
    assert all(o["closed"]["accuracy"] == 0.0 for o in by.values())
    assert by["pefomed"]["open"]["score"] == 1.0 and by["edgemed"]["open"]["score"] == 1.0
    assert by["llava-med"]["open"]["score"] == 1.0 and by["medgemma"]["score"] == 0.5
    with pytest.raises(ParityError, match="unknown scoring protocol 'vqa2'.*pefomed"):
        evaluate(b, recs, protocol="vqa2")


def _pred(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rescore_predictions_cli(tmp_path):
    data = tmp_path / "VQA_RAD Dataset Public.json"
    data.write_text(json.dumps([
        {"qid": 1, "image_name": "a.jpg", "question": "Is there a mass?", "answer": "Yes", "answer_type": "CLOSED",
         "phrase_type": "test_freeform", "question_type": "PRES"},
        {"qid": 2, "image_name": "a.jpg", "question": "Which organ?", "answer": "the liver", "answer_type": "OPEN",
         "phrase_type": "test_para", "question_type": "ORGAN"},
        {"qid": 3, "image_name": "a.jpg", "question": "Is it normal?", "answer": "no", "answer_type": "CLOSED",
         "phrase_type": "freeform", "question_type": "ABN"}]))
    pred = _pred(tmp_path / "pred.jsonl", [{"id": 1, "answer": "yes."}, {"id": "2", "answer": "Liver"}])
    out = tmp_path / "score.json"
    r = CliRunner().invoke(main, ["eval", "--predictions", str(pred), "--data", str(data), "--split", "test",
                                  "--protocol", "pefomed", "--report", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert (rep["overall"], rep["closed"], rep["open"], rep["n"]) == (1.0, 1.0, 1.0, 2)
    # without --split the train question 3 has no answer: one clear error, no report
    out2 = tmp_path / "score2.json"
    r = CliRunner().invoke(main, ["eval", "--predictions", str(pred), "--data", str(data), "--report", str(out2)])
    assert r.exit_code == 2 and "1 records" in r.output and "['3']" in r.output and not out2.exists()
    bad = _pred(tmp_path / "bad.jsonl", [{"id": 1, "answer": 3}, {"id": 1, "answer": "no"}, {"answer": "x"}])
    r = CliRunner().invoke(main, ["eval", "--predictions", str(bad), "--data", str(data)])
    assert r.exit_code == 2 and "bad.jsonl:1" in r.output and "bad.jsonl:3" in r.output
    r = CliRunner().invoke(main, ["eval", "--data", str(data)])
    assert r.exit_code == 2 and "--predictions" in r.output


def test_rescore_reports(tmp_path):
    ann = {"test": [{"id": "s1", "report": "The heart is normal. No effusion.", "image_path": ["s1/0.png"]},
                    {"id": "s2", "report": "Small left effusion.", "image_path": ["s2/0.png", "s2/1.png"]}]}
    data = tmp_path / "annotation.json"
    data.write_text(json.dumps(ann))
    pred = _pred(tmp_path / "p.jsonl", [{"id": "s1", "answer": "the heart is normal . no effusion ."},
                                        {"id": "s2", "answer": "small left effusion ."}])
    rep = rescore(pred, data, task="report")
    assert rep["bleu_1"] == pytest.approx(1.0) and rep["rouge_l"] == pytest.approx(1.0) and rep["n"] == 2
    assert rep["cider"] > 0


def _r2gen(folder, n_train=4, n_val=2, n_test=3):
    """An R2Gen annotation.json with generated report text whose findings depend on the picture."""
    import numpy as np
    from PIL import Image

    ann = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        ann[split] = []
        for i in range(n):
            sid = f"{split}{i}"
            (folder / "images" / sid).mkdir(parents=True)
            bright = i % 2 == 0
            for view in (0, 1):
                Image.fromarray(np.full((40, 40, 3), 220 if bright else 20, dtype=np.uint8)).save(
                    folder / "images" / sid / f"{view}.png")
            report = "Large right effusion. Heart enlarged." if bright else "The heart is normal. No effusion."
            ann[split].append({"id": sid, "report": report, "image_path": [f"{sid}/0.png", f"{sid}/1.png"],
                               "split": split})
    path = folder / "annotation.json"
    path.write_text(json.dumps(ann))
    return path


def test_report_finetune_and_retention_table(tiny_model, tmp_path):
    from edgemed.recipe import Recipe
    from edgemed.train import finetune

    ann = _r2gen(tmp_path / "iu")
    recipe = Recipe.model_validate({
        "model": {"path": str(tiny_model("llava"))}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"lr": 1e-3, "batch_size": 2}, "eval_every": 1, "save_every": 100,
        "stages": [{"name": "report", "max_steps": 2, "train": {"projector": "train", "decoder": "lora"},
                    "data": {"train": str(ann), "validation": str(ann), "format": "r2gen"}}]})
    run = finetune(recipe, tmp_path / "run")
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log] == [1, 2]  # trained on the train split's report text
    res = evaluate_many([tiny_model("llava"), run], ann, task="report", max_tokens=8, report=tmp_path / "r.json")
    base, tuned = res.results
    assert base["overall"]["n"] == 3 and set(base["overall"]) >= {"bleu_1", "bleu_4", "rouge_l", "cider"}
    assert tuned["vs"] == base["label"] and tuned["retention"]["lost"] is None  # no flips for reports
    assert tuned["retention"]["ci_low"] <= tuned["retention"]["delta"] <= tuned["retention"]["ci_high"]
    assert tuned["delta_points"] == pytest.approx(100 * (tuned["overall"]["rouge_l"] - base["overall"]["rouge_l"]))
    table = res.table()
    assert "BLEU-4" in table and "ROUGE-L" in table and "CIDEr" in table
    assert [p["reference"] for p in base["predictions"]][:2] == ["large right effusion . heart enlarged .",
                                                                 "the heart is normal . no effusion ."]
    assert json.loads((tmp_path / "r.json").read_text())["task"] == "report"


def test_eval_compare_cli_prints_ci_flips_and_mcnemar(tiny_model, tmp_path):
    ref = tiny_model("llama")
    data = write_vqa(tmp_path / "d", n=3, image=False)
    r = CliRunner().invoke(main, ["eval", str(ref), "--data", str(data), "--compare", str(ref),
                                  "--protocol", "llava-med"])
    assert r.exit_code == 0, r.output
    assert "protocol llava-med" in r.output and "McNemar p" in r.output
    assert f"{ref.name} vs {ref.name}: +0.0 points (95% CI +0.0 to +0.0, n = 3), 0 of 3 answers flipped" in r.output

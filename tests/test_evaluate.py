"""VQA scoring (normalisation, yes/no synonyms, exact match, token recall), the same prompts on every runtime,
and the retention table."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import write_vqa

from edgemed.artifacts import write_manifest
from edgemed.cli import main
from edgemed.data import VQARecord, read_vqa_jsonl
from edgemed.errors import ParityError
from edgemed.evaluate import evaluate, evaluate_many, normalize, score, yes_no


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
    table = res.table()
    assert "closed acc" in table and "model" in table


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

"""Scoring protocols against hand-computed cases, retention statistics, R2Gen report cleaning and report metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgemed import report_scores
from edgemed.errors import ParityError
from edgemed.report_scores import clean_report_iu_xray, clean_report_mimic_cxr, report_metrics
from edgemed.scoring import (
    PROTOCOLS,
    compare,
    get_protocol,
    llava_med_closed,
    llava_med_recall,
    mcnemar_exact,
    paired_bootstrap_ci,
    pefomed_normalize,
    summarize,
    token_f1,
    vqa_normalize,
    within_points,
)


# ---------------------------------------------------------------- normalisation, rule by rule
@pytest.mark.parametrize("text, want", [
    ("Yes.", "yes"),                      # period not before a digit: deleted
    ("3.5 cm", "3.5 cm"),                 # period before a digit: kept
    ("The X-Ray", "xray"),                # unspaced "-" -> space, article dropped, "x ray" joined (PeFoMed only)
    ("left, upper", "left upper"),        # spaced "," deleted
    ("1,000", "1000"),                    # digit,digit: every mark deleted
    ("two lesions", "2 lesions"),         # number words to digits
    ("none", "0"),                        # ... "none" too (the VQA-v2 table)
    ("dont know", "don't know"),          # contractions restored
    ("CT (head)", "ct head"),             # spaced "(" deleted, unspaced ")" -> space, collapsed
    ("a/b", "b"),                         # "/" unspaced -> space, so "a" becomes a word, an article, dropped
])
def test_pefomed_normalize(text, want):
    assert pefomed_normalize(text) == want


def test_llava_med_normalize_keeps_x_ray_apart():
    assert vqa_normalize("The X-Ray") == "x ray" and pefomed_normalize("x ray") == "xray"
    assert vqa_normalize("Yes, it is.") == "yes it is"


def test_period_strip_stops_after_32_periods():
    # the reference passes re.UNICODE (32) as re.sub's count: the 33rd period survives
    assert pefomed_normalize("a" + "." * 33) == "a."
    assert pefomed_normalize("a" + "." * 32) == ""  # all 32 go, and "a" is an article


# ---------------------------------------------------------------- each protocol: a hand-computed table
# (prediction, reference, answer_type, expected item score)
PEFOMED = [
    ("Yes", "yes", "closed", 1.0),
    ("Yes, there is.", "yes", "closed", 0.0),  # strict equality: a sentence is wrong
    ("The liver.", "liver", "open", 1.0),
    ("x-ray", "X ray", "open", 1.0),
    ("two", "2", "open", 1.0),
    ("left lung", "left", "open", 0.0),
]
LLAVA_MED = [
    ("yes", "yes", "closed", 1.0),
    ("normal", "no", "closed", 0.0),           # LLaVA-Med's substring test said 1: "no" in "normal"
    ("no, normal", "no", "closed", 1.0),
    ("yes or no", "yes", "closed", 0.0),       # both words: not an answer
    ("left upper lobe", "left lobe", "closed", 0.0),  # not contiguous
    ("left lung", "left lung", "open", 1.0),
    ("the left side", "left lung", "open", 0.5),      # tp 1, fn 1
    ("left left", "left lung", "open", 2 / 3),        # tp counts the prediction's 2 "left"s: 2 / (2 + 1)
    ("", "liver", "open", 0.0),
]
MEDGEMMA = [
    ("Yes.", "yes", "closed", 1.0),                    # F1 1
    ("left lung", "left upper lobe", "open", 0.4),     # p 1/2, r 1/3 -> 2pr/(p+r) = 0.4
    ("the liver", "Liver", "open", 1.0),
    ("no", "yes", "closed", 0.0),
]
EDGEMED = [
    ("Yes, there is a lesion.", "yes", "closed", 1.0),
    ("None", "no", "closed", 1.0),
    ("normal", "no", "closed", 0.0),
    ("Left.", "left", "closed", 1.0),
    ("The large lesion", "large", "open", 0.0),
    ("Small.", "small", "open", 1.0),
]


@pytest.mark.parametrize("name, table", [("pefomed", PEFOMED), ("llava-med", LLAVA_MED), ("medgemma", MEDGEMMA),
                                         ("edgemed", EDGEMED)])
def test_protocol_table(name, table):
    p = get_protocol(name)
    got = [p.score_one(pred, ref, t).score for pred, ref, t, _ in table]
    assert got == pytest.approx([w for *_, w in table])


def test_llava_med_helpers_directly():
    assert llava_med_recall("left left", "left lung") == pytest.approx(2 / 3)
    assert llava_med_closed("normal", "no") is False and llava_med_closed("No.", "no") is True
    assert token_f1("", "") == 1.0 and token_f1("a", "liver") == 0.0  # "a" is an article: empty vs non-empty


def _items(name, table):
    p = get_protocol(name)
    out = []
    for pred, ref, t, _ in table:
        s = p.score_one(pred, ref, t)
        out.append({"answer_type": t, "score": s.score, "hit": s.hit, "metrics": s.metrics})
    return out


def test_summaries_by_answer_type():
    s = summarize(_items("pefomed", PEFOMED), "pefomed")
    assert s["n"] == 6 and s["closed"]["n"] == 2 and s["open"]["n"] == 4
    assert s["closed"]["accuracy"] == 0.5 and s["open"]["score"] == 0.75 and s["score"] == pytest.approx(4 / 6)
    m = summarize(_items("medgemma", MEDGEMMA), "medgemma")
    assert m["score"] == pytest.approx((1 + 0.4 + 1 + 0) / 4)  # F1 over all questions
    assert m["closed"]["accuracy"] == 0.5 and m["open"]["score"] == pytest.approx(0.7)
    llm = summarize(_items("llava-med", LLAVA_MED), "llava-med")
    assert llm["closed"]["accuracy"] == pytest.approx(2 / 5)  # every closed question in the denominator
    assert llm["open"]["score"] == pytest.approx((1 + 0.5 + 2 / 3 + 0) / 4)


def test_every_protocol_has_rules_and_unknown_is_refused():
    assert set(PROTOCOLS) == {"edgemed", "pefomed", "llava-med", "medgemma"}
    assert all(p.rules for p in PROTOCOLS.values())
    with pytest.raises(ParityError, match="unknown scoring protocol 'x'"):
        get_protocol("x")


# ---------------------------------------------------------------- retention statistics
def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)           # 2 * 0.5^5
    assert mcnemar_exact(5, 1) == pytest.approx(2 * 7 / 64)       # 2 * (C(6,0) + C(6,1)) / 2^6
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)


def test_flips_that_cancel_are_counted():
    ref = [{"score": float(h), "hit": h} for h in [1, 1, 1, 0, 0, 0, 1, 1]]
    cand = [{"score": float(h), "hit": h} for h in [0, 0, 1, 1, 1, 0, 1, 1]]
    r = compare(ref, cand)
    assert r.delta == 0.0 and r.lost == 2 and r.gained == 2 and r.flip_rate == 0.5 and r.mcnemar_p == 1.0
    assert r.ci_low < 0 < r.ci_high  # flips that cancel still widen the interval
    assert "4 of 8 answers flipped" in r.text() and "within" not in r.text()


def test_bootstrap_ci_brackets_the_change_and_is_reproducible():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 200).astype(float)
    b = a.copy()
    b[:20] = 0.0  # 20 drops at most
    lo, hi = paired_bootstrap_ci(a, b)
    d = (b.sum() - a.sum()) / 200
    assert lo <= d <= hi and hi <= 0.0 and (lo, hi) == paired_bootstrap_ci(a, b)
    # the paired SE: sqrt(var(d)/n); the 95% percentile CI is about +-1.96 SE wide
    se = np.std(b - a) / math.sqrt(200)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_within_claim_only_when_the_ci_says_so():
    same = [{"score": 1.0, "hit": True}] * 50
    r = compare(same, same)
    assert within_points(r) == 0.5 and "the CI lies within 0.5 points" in r.text()
    wide = compare([{"score": float(i % 2), "hit": bool(i % 2)} for i in range(40)],
                   [{"score": float(1 - i % 2), "hit": not i % 2} for i in range(40)])
    assert within_points(wide) is None


def test_compare_needs_the_same_questions():
    with pytest.raises(ParityError, match="same questions"):
        compare([{"score": 1.0, "hit": True}], [])


# ---------------------------------------------------------------- reports
def test_r2gen_cleaning():
    assert clean_report_iu_xray("The heart is normal. 2. No effusion.. Lungs (clear)!") == \
        "the heart is normal . no effusion . lungs clear ."
    assert clean_report_iu_xray("1. Heart size normal. 2. No pneumothorax.") == "heart size normal . no pneumothorax ."
    # MIMIC: newlines and underscore runs (the de-identification marks) collapsed
    assert clean_report_mimic_cxr("FINDINGS:\nPatient ___ is stable.  No change.") == \
        "findings patient  is stable . no change ."


def test_report_metrics_by_hand(monkeypatch):
    refs = {"a": "no acute disease .", "b": "small left effusion ."}
    perfect = report_metrics(refs, dict(refs), meteor=False)
    assert perfect["bleu_1"] == pytest.approx(1.0) and perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0) and perfect["meteor"] is None
    # one hypothesis halved: BLEU-1 = clipped unigram precision x brevity penalty over the corpus
    half = report_metrics(refs, {"a": "no acute disease .", "b": "small effusion"}, meteor=False)
    assert half["bleu_1"] < 1.0 and half["cider"] < perfect["cider"]
    assert half["per_item"]["rouge_l"][0] == pytest.approx(1.0) and half["per_item"]["rouge_l"][1] < 1.0
    # newlines and "|||" in a generated report are flattened (METEOR's line protocol would hang on them)
    odd = report_metrics(refs, {"a": "no acute\ndisease .", "b": "small ||| left effusion ."}, meteor=False)
    assert odd["bleu_1"] == pytest.approx(1.0) and odd["rouge_l"] == pytest.approx(1.0)
    monkeypatch.setattr(report_scores.shutil, "which", lambda name: None)
    r = report_metrics(refs, dict(refs))
    assert r["meteor"] is None and "no Java runtime" in r["meteor_skipped"]
    with pytest.raises(ParityError, match="missing"):
        report_metrics(refs, {"a": "x"})


@pytest.mark.skipif(not report_scores.java_available(), reason="no Java runtime: METEOR's scorer is a Java jar")
def test_meteor_with_java_scores_exact_reports_higher():
    refs = {"a": "no acute disease .", "b": "small left effusion ."}
    exact = report_metrics(refs, dict(refs), meteor=True)
    wrong = report_metrics(refs, {"a": "large right effusion .", "b": "heart enlarged ."}, meteor=True)
    assert exact["meteor_skipped"] is None and exact["meteor"] > 0.9
    assert wrong["meteor"] < 0.5 * exact["meteor"] and len(wrong["per_item"]["meteor"]) == 2

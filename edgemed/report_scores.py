"""Report generation: R2Gen's report cleaning, and BLEU-1..4, ROUGE-L, CIDEr-D (METEOR with Java) through
pycocoevalcap's scorers, called directly."""

from __future__ import annotations

import re
import shutil
from typing import Any

from edgemed.errors import ParityError

_R2GEN_SENT_CHARS = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")  # R2Gen's class; ":-\[" is a range (":" to "[")


def _r2gen_sentences(text: str) -> list[str]:
    clean = lambda t: _R2GEN_SENT_CHARS.sub("", t.replace('"', "").replace("/", "").replace("\\", "")  # noqa: E731
                                            .replace("'", "").strip().lower())
    # R2Gen's filter compares a string with [] and so keeps empty sentences; kept for identical output
    return [clean(s) for s in text.strip().lower().split(". ")]


def clean_report_iu_xray(report: str) -> str:
    """R2Gen's clean_report_iu_xray: numbered lists and doubled periods undone, sentences cleaned and joined
    with " . "."""
    t = report.replace("..", ".").replace("..", ".").replace("..", ".").replace("1. ", "")
    for n in "2345":
        t = t.replace(f". {n}. ", ". ")
    for n in "2345":
        t = t.replace(f" {n}. ", ". ")
    return " . ".join(_r2gen_sentences(t)) + " ."


def clean_report_mimic_cxr(report: str) -> str:
    """R2Gen's clean_report_mimic_cxr: newlines, runs of underscores, spaces and periods collapsed as R2Gen
    does (a fixed number of passes), then as for IU-Xray."""
    t = report.replace("\n", " ")
    for _ in range(7):
        t = t.replace("__", "_")
    for _ in range(6):
        t = t.replace("  ", " ")
    for _ in range(8):
        t = t.replace("..", ".")
    t = t.replace("1. ", "")
    for n in "2345":
        t = t.replace(f". {n}. ", ". ")
    for n in "2345":
        t = t.replace(f" {n}. ", ". ")
    return " . ".join(_r2gen_sentences(t)) + " ."


REPORT_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "meteor")


def java_available() -> bool:
    """METEOR's scorer runs a Java jar; without a Java runtime it is skipped (and said so)."""
    return shutil.which("java") is not None


def report_metrics(references: dict[str, str], hypotheses: dict[str, str], meteor: bool | None = None
                   ) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR with Java) of generated reports, by pycocoevalcap's scorers.

    The scorers are called directly (COCOEvalCap.evaluate would start Java and fetch CoreNLP for SPICE) on
    whitespace tokens, as R2Gen scores cleaned reports. CIDEr-D is corpus-level (its document frequencies come
    from the references), so the whole test set is scored in one call.

    Args:
        references: id -> reference report (already cleaned).
        hypotheses: id -> generated report, the same ids.
        meteor: score METEOR; None: when a Java runtime is found.

    Returns:
        ``{"n", "bleu_1".."bleu_4", "rouge_l", "cider", "meteor" (None if skipped), "meteor_skipped" (reason or
        None), "per_item": {metric: [per-report scores in id order]}, "ids": [...]}``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(hypotheses):
        missing = sorted(set(references) - set(hypotheses))[:5]
        extra = sorted(set(hypotheses) - set(references))[:5]
        raise ParityError(f"report metrics need one generated report per reference; missing {missing}, "
                          f"unknown {extra}")
    if not references:
        raise ParityError("report metrics need at least one report")
    ids = sorted(references)

    def one_line(text: str) -> str:
        # METEOR's jar reads one line per segment and "|||" as its field mark: a generated newline or "|||"
        # would leave it waiting forever. An empty text breaks the n-gram code: "." scores (near) zero instead.
        return " ".join(text.replace("|||", " ").split()) or "."

    gts = {i: [one_line(references[i])] for i in ids}
    res = {i: [one_line(hypotheses[i])] for i in ids}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    out: dict[str, Any] = {"n": len(ids), "ids": ids}
    per: dict[str, list[float]] = {}
    for k in range(4):
        out[f"bleu_{k + 1}"] = float(bleu[k])
        per[f"bleu_{k + 1}"] = [float(x) for x in bleu_each[k]]
    out["rouge_l"], per["rouge_l"] = float(rouge), [float(x) for x in rouge_each]
    out["cider"], per["cider"] = float(cider), [float(x) for x in cider_each]
    use_meteor = java_available() if meteor is None else meteor
    out["meteor"], out["meteor_skipped"] = None, None
    if use_meteor and java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        m, m_each = Meteor().compute_score(gts, res)
        out["meteor"], per["meteor"] = float(m), [float(x) for x in m_each]
    else:
        out["meteor_skipped"] = "no Java runtime found (METEOR's scorer is a Java jar)" if use_meteor or \
            not java_available() else "not requested"
    out["per_item"] = per
    return out

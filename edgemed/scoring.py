"""Scoring protocols for medical VQA and retention statistics (report-generation metrics: edgemed.report_scores).

A protocol is a paper's scoring rules, reproduced exactly, so that an edgemed figure can be set beside the
paper's (docs/evaluation.md shows each protocol's rules):

* ``edgemed`` (default): yes/no read from the answer's first word with synonyms; open answers by exact match
  (token recall also reported). Default because a chat model answers "Yes, there is a lesion." and the
  paper protocols below score that wrong (pefomed) or by substring (llava-med).
* ``pefomed``: VQA-v2 answer normalisation, then strict string equality, by the data set's answer_type
  (PeFoMed's ``medvqa_tools/vqa_eval.py``).
* ``llava-med``: LLaVA-Med's ``normalize_word``; open questions by its token recall; closed questions by
  accuracy, with every closed question in the denominator and a whole-word test instead of LLaVA-Med's
  substring test (under which ground truth "no" matched "normal").
* ``medgemma``: SQuAD-style token F1 over all questions, plus exact-match accuracy on the closed subset.

``compare`` gives the honest retention figures of one model against another on the same questions: the flip
counts, a paired bootstrap 95% CI of the score change, and McNemar's exact test.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgemed.errors import ParityError

# ---------------------------------------------------------------- edgemed's own rules (the default)
ARTICLES = ("a", "an", "the")
# Closed answers are mapped to yes/no from the prediction's first word. "none" is read as "no" because closed
# questions in VQA-RAD and SLAKE ask whether something is present ("Is there ...?"), where "None." denies it;
# "present"/"absent" and "positive"/"negative" are how radiology reports say yes/no; "normal" is not mapped
# (it answers a different question than presence).
YES = frozenset({"yes", "yeah", "yep", "true", "present", "positive", "correct", "affirmative"})
NO = frozenset({"no", "nope", "none", "false", "absent", "negative", "incorrect", "not"})
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, articles removed, whitespace collapsed."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def yes_no(text: str) -> str | None:
    """"yes" or "no" for an answer whose first word says so (synonyms mapped), else None."""
    words = normalize(text).split()
    if not words:
        return None
    if words[0] in YES:
        return "yes"
    if words[0] in NO:
        return "no"
    return None


def score(prediction: str, reference: str, answer_type: str) -> dict[str, float]:
    """edgemed's scores of one answer: closed -> ``correct``; open -> ``exact`` and ``recall``; both ``score``.

    ``score`` is what the overall figure averages: accuracy for closed, exact match for open.
    """
    ref, pred = normalize(reference), normalize(prediction)
    if answer_type == "closed":
        want = yes_no(reference)
        if want is not None:
            ok = yes_no(prediction) == want
        else:  # a fixed-choice closed answer (left/right, CT/MRI): the prediction must name it
            ok = pred == ref or pred.split()[:len(ref.split())] == ref.split()
        return {"correct": float(ok), "score": float(ok)}
    ref_words, pred_words = ref.split(), set(pred.split())
    recall = sum(w in pred_words for w in ref_words) / len(ref_words) if ref_words else float(not pred_words)
    exact = float(pred == ref)
    return {"exact": exact, "recall": recall, "score": exact}


# ---------------------------------------------------------------- VQA-v2 answer normalisation
# The tables and the two passes of the official VQA-v2 evaluation (vqaEval.py), which PeFoMed's MedVQAEval and
# LLaVA-Med's normalize_word both copy. Written out because no installable package carries them.
_CONTRACTIONS = dict(pair.split(":") for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd "
    "howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've "
    "it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
    "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
    "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've "
    "somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd "
    "someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's "
    "somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll "
    "thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's "
    "theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've "
    "twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll "
    "whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've "
    "whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll "
    "whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've "
    "wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
    "y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll "
    "youre:you're youve:you've").split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!")
# "(?!<=\d)" is the reference's typo for a lookbehind; kept, since it decides which periods go.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_punctuation(text: str) -> str:
    """VQA-v2 processPunctuation: each mark is deleted when spaced (or the text has a digit,digit), else made a
    space; then periods not before a digit are deleted (at most 32: the reference passes re.UNICODE as count)."""
    out = text
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def vqa_digit_article(text: str) -> str:
    """VQA-v2 processDigitArticle: lowercase, number words to digits, articles dropped, contractions restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """LLaVA-Med's normalize_word (the VQA-v2 passes, then commas removed)."""
    return vqa_digit_article(vqa_punctuation(text)).replace(",", "")


def pefomed_normalize(text: str) -> str:
    """PeFoMed's preprocess_answer: the VQA-v2 passes, commas removed, "x ray" joined to "xray"."""
    out = vqa_digit_article(vqa_punctuation(str(text)))
    return out.replace(",", "").replace("x ray", "xray").replace("\n", " ").replace("\t", " ")


def _word_counts(text: str) -> Counter[str]:
    """LLaVA-Med's split_sentence(text, 1): lowercase, whitespace split, counts."""
    return Counter(text.lower().strip().split())


def llava_med_recall(prediction: str, reference: str) -> float:
    """LLaVA-Med's open-question recall (calculate_f1score's third value), as its code computes it.

    A reference word found in the prediction adds the prediction's count of it to the true positives, so a
    repeated word can lift recall; reference words missing from the prediction count once each.
    """
    cand, ref = _word_counts(vqa_normalize(prediction)), _word_counts(vqa_normalize(reference))
    if not cand or not ref:
        return 0.0
    tp = sum(c for w, c in cand.items() if w in ref)
    fn = sum(c for w, c in ref.items() if w not in cand)
    return tp / (tp + fn) if tp else 0.0


def llava_med_closed(prediction: str, reference: str) -> bool:
    """Closed accuracy of protocol llava-med, with LLaVA-Med's substring bug fixed.

    LLaVA-Med counts a closed answer right when the reference is a *substring* of the prediction (so "no"
    matches "normal") and, before its PR #35, dropped wrong yes/no answers from the denominator. Here the
    reference's words must appear as whole words, in order; for a yes/no reference the opposite word must not
    appear; and every closed question counts.
    """
    ref, pred = vqa_normalize(reference).split(), vqa_normalize(prediction).split()
    if not ref:
        return not pred
    if ref in (["yes"], ["no"]):
        other = "no" if ref == ["yes"] else "yes"
        return ref[0] in pred and other not in pred
    return any(pred[i:i + len(ref)] == ref for i in range(len(pred) - len(ref) + 1))


def squad_normalize(text: str) -> str:
    """SQuAD's normalize_answer: lowercase, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of two answers (bag of words after squad_normalize); 1.0 when both are empty."""
    p, r = squad_normalize(prediction).split(), squad_normalize(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- protocols
@dataclass(frozen=True)
class ItemScore:
    """One answer under one protocol.

    Attributes:
        score: What the overall figure averages.
        hit: Full credit (the answer is right); flips and McNemar's test count these.
        metrics: The protocol's per-answer numbers (``correct``, ``exact``, ``recall``, ``f1``).
    """

    score: float
    hit: bool
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Protocol:
    """A paper's scoring rules.

    Attributes:
        name: ``--protocol`` value.
        rules: What the protocol does, one line per rule (printed in docs and reports).
        closed_metric: Per-answer metric whose mean is the closed figure.
        open_metric: Per-answer metric whose mean is the open figure.
        score_one: (prediction, reference, answer_type) -> ItemScore.
    """

    name: str
    rules: tuple[str, ...]
    closed_metric: str
    open_metric: str
    score_one: Callable[[str, str, str], ItemScore]


def _edgemed(pred: str, ref: str, atype: str) -> ItemScore:
    s = score(pred, ref, atype)
    return ItemScore(s["score"], s["score"] == 1.0, {k: v for k, v in s.items() if k != "score"})


def _pefomed(pred: str, ref: str, atype: str) -> ItemScore:
    ok = float(pefomed_normalize(pred) == pefomed_normalize(ref))
    return ItemScore(ok, bool(ok), {"exact": ok})


def _llava_med(pred: str, ref: str, atype: str) -> ItemScore:
    if atype == "closed":
        ok = float(llava_med_closed(pred, ref))
        return ItemScore(ok, bool(ok), {"correct": ok})
    r = llava_med_recall(pred, ref)
    return ItemScore(r, r == 1.0, {"recall": r})


def _medgemma(pred: str, ref: str, atype: str) -> ItemScore:
    f1 = token_f1(pred, ref)
    exact = float(squad_normalize(pred) == squad_normalize(ref))
    return ItemScore(f1, bool(exact), {"f1": f1, "exact": exact})


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("edgemed", (
        "text normalised: lowercase, punctuation to spaces, articles a/an/the dropped",
        "closed yes/no: the prediction's first word read as yes/no (synonyms: present/absent, positive/negative, "
        "none = no); other closed answers: the prediction equals or starts with the reference",
        "open: exact match (score); token recall reported alongside",
        "overall: mean over all questions of closed accuracy and open exact match",
    ), "correct", "exact", _edgemed),
    Protocol("pefomed", (
        "VQA-v2 answer normalisation (punctuation, periods, number words to digits, articles, contractions), "
        "commas removed, 'x ray' -> 'xray' (PeFoMed medvqa_tools/vqa_eval.py)",
        "every question: strict string equality of the normalised answers",
        "closed / open: the same, by the data set's answer_type; overall: all questions",
    ), "exact", "exact", _pefomed),
    Protocol("llava-med", (
        "LLaVA-Med normalize_word (the VQA-v2 normalisation, commas removed)",
        "open: LLaVA-Med's token recall (calculate_f1score, as its code computes it)",
        "closed: the reference's words appear as whole words in the prediction (a yes/no reference: and the "
        "opposite word does not); every closed question in the denominator. LLaVA-Med itself tests a substring "
        "(ground truth 'no' matches 'normal') and dropped wrong yes/no answers until its PR #35: not reproduced",
        "overall: mean over all questions of closed accuracy and open recall (LLaVA-Med reports no overall)",
    ), "correct", "recall", _llava_med),
    Protocol("medgemma", (
        "SQuAD normalisation (lowercase, punctuation and articles removed)",
        "overall: token F1 over all questions; open: token F1 over open questions",
        "closed: exact-match accuracy of the normalised answers on the closed subset",
    ), "exact", "f1", _medgemma),
)}
DEFAULT_PROTOCOL = "edgemed"


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; a ParityError naming the choices otherwise."""
    if name not in PROTOCOLS:
        raise ParityError(f"unknown scoring protocol {name!r} for --protocol; choose one of "
                          f"{', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(items: Sequence[dict[str, Any]], protocol: str = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """Summary of scored items (dicts with ``answer_type``, ``score`` and the protocol's metrics).

    Returns:
        ``{"protocol", "n", "score", "closed": {"n", "accuracy", <metric means>}, "open": {"n", "score",
        <metric means>}}``; ``score`` is the overall figure, ``closed.accuracy`` and ``open.score`` the
        protocol's closed and open figures (None for an empty subset).
    """
    p = get_protocol(protocol)
    out: dict[str, Any] = {"protocol": p.name, "n": len(items),
                           "score": _mean([i["score"] for i in items]) or 0.0}
    for kind, metric, key in (("closed", p.closed_metric, "accuracy"), ("open", p.open_metric, "score")):
        sub = [i for i in items if i["answer_type"] == kind]
        names = sorted({k for i in sub for k in i.get("metrics", {})})
        block: dict[str, Any] = {"n": len(sub)}
        for k in names:
            block[k] = _mean([i["metrics"][k] for i in sub if k in i["metrics"]])
        block[key] = block.get(metric)
        out[kind] = block
    return out


# ---------------------------------------------------------------- retention statistics
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Retention:
    """One model against a reference model on the same questions.

    Attributes:
        n: Questions compared.
        delta: Change of the overall score (candidate - reference), as a fraction.
        ci_low: Lower end of the paired bootstrap 95% CI of ``delta``.
        ci_high: Upper end.
        lost: Questions the reference got right and the candidate wrong (None: no right/wrong, as for reports).
        gained: Questions the reference got wrong and the candidate right.
        flip_rate: (lost + gained) / n.
        mcnemar_p: Two-sided exact McNemar p-value over the flips (1.0 when nothing flipped).
    """

    n: int
    delta: float
    ci_low: float
    ci_high: float
    lost: int | None = None
    gained: int | None = None
    flip_rate: float | None = None
    mcnemar_p: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """One sentence a report can print; it says "within N points" only where the CI does."""
        pts = lambda v: f"{100 * v:+.1f}"  # noqa: E731
        s = f"{pts(self.delta)} points (95% CI {pts(self.ci_low)} to {pts(self.ci_high)}, n = {self.n})"
        if self.lost is not None and self.gained is not None:
            s += (f", {self.lost + self.gained} of {self.n} answers flipped ({self.lost} lost, {self.gained} "
                  f"gained, {100 * (self.flip_rate or 0):.1f}%), McNemar exact p = {self.mcnemar_p:.3g}")
        bound = within_points(self)
        return s + (f"; the CI lies within {bound:g} points" if bound is not None else "")


def within_points(r: Retention, bounds: Sequence[float] = (0.5, 1, 2, 5)) -> float | None:
    """The smallest bound (in points) that the whole 95% CI lies within, or None: the only "within N points"
    claim edgemed prints."""
    for b in bounds:
        if -b / 100 <= r.ci_low and r.ci_high <= b / 100:
            return b
    return None


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar test: the binomial(lost + gained, 1/2) probability of a split at least this
    uneven. Written out (a few lines) rather than adding scipy for one binomial tail."""
    n = lost + gained
    if n == 0:
        return 1.0
    k = min(lost, gained)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap_ci(ref: Sequence[float], cand: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                        seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of mean(cand) - mean(ref), resampling questions (the same ones for both models)."""
    a, b = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ParityError(f"paired bootstrap needs two score lists of the same non-zero length, got {a.size} and "
                          f"{b.size}")
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // d.size)  # bounded memory on large test sets
    for s in range(0, samples, chunk):
        m = min(chunk, samples - s)
        means[s:s + m] = d[rng.integers(0, d.size, size=(m, d.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def compare(ref_items: Sequence[dict[str, Any]], cand_items: Sequence[dict[str, Any]], flips: bool = True
            ) -> Retention:
    """Retention of ``cand_items`` against ``ref_items``: both scored on the same questions in the same order
    (dicts with ``score`` and, for ``flips``, ``hit``)."""
    if len(ref_items) != len(cand_items):
        raise ParityError(f"cannot compare {len(cand_items)} answers with {len(ref_items)}: the two runs must "
                          "answer the same questions")
    ref_s = [float(i["score"]) for i in ref_items]
    cand_s = [float(i["score"]) for i in cand_items]
    n = len(ref_items)
    lo, hi = paired_bootstrap_ci(ref_s, cand_s)
    delta = (sum(cand_s) - sum(ref_s)) / n
    if not flips:
        return Retention(n=n, delta=delta, ci_low=lo, ci_high=hi)
    lost = sum(bool(r["hit"]) and not bool(c["hit"]) for r, c in zip(ref_items, cand_items, strict=True))
    gained = sum(not bool(r["hit"]) and bool(c["hit"]) for r, c in zip(ref_items, cand_items, strict=True))
    return Retention(n=n, delta=delta, ci_low=lo, ci_high=hi, lost=lost, gained=gained,
                     flip_rate=(lost + gained) / n, mcnemar_p=mcnemar_exact(lost, gained))

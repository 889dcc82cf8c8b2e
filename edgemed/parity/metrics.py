"""The numbers of a comparison: per-position logit figures, image-embedding cosines, and the running accumulator
that sums them over the probes into one :class:`Metrics` record. Pure numpy: no runtime, no policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Metrics:
    """The figures of one candidate (or one candidate pair) over every probe position.

    ``top1`` counts all positions; ``top1_decided`` and ``flip_rate`` only those the reference decides by at least
    ``decided_margin`` nats. ``image_cos`` is None where no image embeddings were compared.
    """

    positions: int
    top1: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    logit_diff_max: float
    greedy_match: float
    image_cos: float | None
    first_divergence: tuple[dict[str, Any], ...]
    decided_margin: float
    decided_positions: int
    top1_decided: float
    flip_rate: float


@dataclass(frozen=True)
class PositionFigures:
    """Per-position figures of one logits comparison (see :func:`compare_logits`)."""

    kl: np.ndarray
    top1: np.ndarray
    diff: np.ndarray
    margin: np.ndarray


@dataclass(frozen=True)
class RefLogits:
    """The reference side of :func:`compare_logits`, worked out once per probe and shared by every candidate (and
    every pair on the same base): its log-probabilities and probabilities in float64, top-1 and margin."""

    raw: np.ndarray  # [positions, vocab] float32 as the runtime gave them
    logp: np.ndarray
    p: np.ndarray
    top1: np.ndarray
    margin: np.ndarray

    @classmethod
    def of(cls, logits: np.ndarray) -> RefLogits:
        x = logits.astype(np.float64)
        x -= x.max(axis=-1, keepdims=True)
        e = np.exp(x)
        s = e.sum(axis=-1, keepdims=True)
        logp = x - np.log(s)
        e /= s  # the probabilities, without a second exp
        if logits.shape[-1] > 1:  # the top two by partition: the same two values a full sort gives
            top2 = np.partition(logits, -2, axis=-1)[:, -2:]
            margin = (top2[:, 1] - top2[:, 0]).astype(np.float64)
        else:
            margin = np.full(len(logits), np.inf)
        return cls(logits, logp, e, logits.argmax(-1), margin)

    @property
    def width(self) -> int:
        return int(self.raw.shape[-1])


def compare_logits(ref: np.ndarray | RefLogits, cand: np.ndarray) -> PositionFigures:
    """Per-position KL(ref || cand), top-1 agreement, largest absolute logit difference, and the reference's margin
    (its top-1 logit minus its runner-up's, in nats) that says whether the position is decided.

    ``ref`` may be given as :class:`RefLogits` (worked out once for several candidates); the figures are the same.
    """
    width = ref.width if isinstance(ref, RefLogits) else ref.shape[-1]
    v = min(width, cand.shape[-1])
    if not isinstance(ref, RefLogits) or v < width:
        ref = RefLogits.of(np.asarray((ref.raw if isinstance(ref, RefLogits) else ref)[:, :v]))
    cand = cand[:, :v]
    # log_softmax of the candidate and KL, in place on one float64 buffer (this is most of a parity run's numpy time)
    buf = cand.astype(np.float64)
    buf -= buf.max(axis=-1, keepdims=True)
    buf -= np.log(np.exp(buf).sum(axis=-1, keepdims=True))
    np.subtract(ref.logp, buf, out=buf)
    kl = np.einsum("ij,ij->i", ref.p, buf)
    # float32 is exact here for close values (Sterbenz); elsewhere within one float32 ulp of the float64 figure
    diff = np.abs(ref.raw - cand).max(axis=-1).astype(np.float64) if len(cand) else np.zeros(0)
    return PositionFigures(kl=np.maximum(kl, 0.0), top1=(ref.top1 == cand.argmax(-1)), diff=diff,
                           margin=ref.margin)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows (image tokens); 0 when the shapes differ."""
    if a.shape != b.shape:
        return 0.0
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
    return float((num / den).mean())


def bos_count(tokens: list[int], bos: int | None) -> int:
    """How many BOS tokens open the sequence."""
    n = 0
    while bos is not None and n < len(tokens) and tokens[n] == bos:
        n += 1
    return n


@dataclass
class Accumulator:
    """Running figures of one candidate over the probes, and what the identity checks saw."""

    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    diff: list[np.ndarray] = field(default_factory=list)
    margin: list[np.ndarray] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)
    first_divergence: list[dict[str, Any]] = field(default_factory=list)
    cos: list[float] = field(default_factory=list)
    template_same: list[bool] = field(default_factory=list)
    tokens_same: list[bool] = field(default_factory=list)
    token_diff: list[str] = field(default_factory=list)
    image_token_diff: list[str] = field(default_factory=list)  # the first probe whose image token count differs
    bos: list[tuple[int, int]] = field(default_factory=list)
    widths: set[tuple[int, int]] = field(default_factory=set)
    worst: dict[str, Any] = field(default_factory=dict)

    def add(self, r: PositionFigures, probe: int, source: str, seq: list[int], lref: np.ndarray, lc: np.ndarray,
            piece: Callable[[int], str]) -> None:
        """Add one probe's figures; keep the position of largest KL as the worst (``piece`` names its tokens)."""
        self.kl.append(r.kl)
        self.top1.append(r.top1)
        self.diff.append(r.diff)
        self.margin.append(r.margin)
        j = int(r.kl.argmax())
        if not self.worst or r.kl[j] > self.worst["kl"]:
            self.worst = {"probe": probe, "source": source, "position": j, "token": piece(seq[j]),
                          "kl": float(r.kl[j]), "ref_top1": piece(int(lref[j].argmax())),
                          "export_top1": piece(int(lc[j].argmax()))}

    def metrics(self, decided_margin: float, pair: bool = False) -> Metrics:
        """The figures so far; agreement on decided positions counts those the reference leads by ``decided_margin``
        nats. A pair (candidate vs candidate) has no greedy answers of its own: its greedy match reads 1."""
        kl = np.concatenate(self.kl) if self.kl else np.zeros(1)
        margin = np.concatenate(self.margin) if self.margin else np.zeros(0)
        decided = margin >= decided_margin
        agree = np.concatenate(self.top1)[decided] if self.top1 and decided.any() else np.ones(1, bool)
        return Metrics(
            positions=int(kl.size), top1=float(np.concatenate(self.top1).mean()) if self.top1 else 1.0,
            kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
            logit_diff_max=float(np.concatenate(self.diff).max()) if self.diff else 0.0,
            greedy_match=float(np.mean(self.greedy)) if self.greedy else 1.0 if pair else 0.0,
            image_cos=float(min(self.cos)) if self.cos else None, first_divergence=tuple(self.first_divergence),
            decided_margin=decided_margin, decided_positions=int(decided.sum()),
            top1_decided=float(agree.mean()), flip_rate=float(1.0 - agree.mean()))

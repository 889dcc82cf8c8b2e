"""What parity returns: one :class:`Row` per compared file or stage, the :class:`ParityResult` around them, its
readable table and its JSON report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemed.artifacts import atomic_file
from edgemed.parity.metrics import Metrics
from edgemed.parity.thresholds import DECIDED_MARGIN, Thresholds


@dataclass
class Row:
    """The comparison of one export file (or one stage of localisation) with its reference."""

    label: str
    quant: str
    backend: str
    metrics: Metrics
    checks: dict[str, Any] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    failures: list[str] = field(default_factory=list)
    worst: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # worse than its type usually measures; not a verdict

    @property
    def passed(self) -> bool:
        return not self.failures

    def causes(self) -> list[str]:
        """The kinds of failure: tokenizer, template, bos, vocab, weights, greedy, image."""
        return sorted({f.split(":", 1)[0] for f in self.failures})

    def why(self, causes: tuple[str, ...]) -> str:
        """The failures of these kinds, joined and cut short for a verdict line."""
        return "; ".join(f for f in self.failures if f.split(":", 1)[0] in causes)[:240]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


@dataclass
class ParityResult:
    """Rows (one per export file), localisation stages, the verdict, and the settings used."""

    export: str
    reference: str
    rows: list[Row]
    probes: int
    positions: int
    seconds: float
    localisation: list[Row] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)
    smallest_passing: str | None = None
    merge: Row | None = None  # adapter vs merged, when the run folder was given
    prompt_format: str = "chat"  # "plain": a base model without a chat template was probed with text prompts
    calibration: dict[str, Any] | None = None  # the export's calibration data and that the probes are disjoint
    runtimes: dict[str, str | None] = field(default_factory=dict)  # builds the figures hold for (machine.py)
    machine: str = ""  # edgemed doctor's one line for the machine that measured them
    reference_cache: dict[str, Any] | None = None  # key, hit, path, model calls (edgemed.parity.reference)
    greedy: dict[str, int] = field(default_factory=dict)  # probes answered free-running, of how many, max tokens
    reference_dtype: str = "float32"  # the PyTorch reference's dtype (16-bit where float32 did not fit)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows) and (self.merge is None or self.merge.passed)

    def to_dict(self) -> dict[str, Any]:
        return {"export": self.export, "reference": self.reference, "passed": self.passed, "probes": self.probes,
                "prompt_format": self.prompt_format,
                "positions": self.positions, "seconds": round(self.seconds, 1),
                "smallest_passing": self.smallest_passing, "verdict": self.verdict,
                "rows": [r.to_dict() for r in self.rows],
                "merge": self.merge.to_dict() if self.merge else None,
                "localisation": [r.to_dict() for r in self.localisation],
                "calibration": self.calibration, "runtimes": self.runtimes, "machine": self.machine,
                "reference_cache": self.reference_cache, "greedy": self.greedy,
                "reference_dtype": self.reference_dtype}

    def write(self, report: Path | str) -> None:
        """Write the JSON report; a report is refreshed on every run, so replacing it is expected (written whole,
        then renamed)."""
        with atomic_file(report, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")

    def table(self) -> str:
        """A readable table: one line per row and stage, then each failure and the verdict."""
        head = (f"{'':3}{'file':<21}{'quant':<10}{'KL mean':>10}{'KL p99':>10}{'flips':>7}{'top1':>7}{'KL max':>9}"
                f"{'dlogit':>8}{'greedy':>8}{'img cos':>9}  tok tmpl bos")
        lines = [f"parity: {self.export}  vs  {self.reference}  ({self.probes} probes, {self.positions} positions, "
                 f"{self.seconds:.0f} s)",
                 f"flips: top-1 changes on positions the reference decides by >= {DECIDED_MARGIN:g} nats; top1: over "
                 "all positions (near-ties included, not a gate)"]
        if self.reference_dtype != "float32":
            lines.append(f"reference: PyTorch in {self.reference_dtype} (float32 did not fit in memory); float files "
                         "are judged by the bf16 bounds")
        if self.greedy:
            g = self.greedy
            lines.append(f"greedy: free-running answers on {g['probes']} of {g['of']} probes, at most "
                         f"{g['max_tokens']} tokens each")
        if self.reference_cache:
            c = self.reference_cache
            lines.append(f"reference: {'from the cache' if c['hit'] else 'computed'} (key {c['key'][:12]}…"
                         f"{', kept in ' + c['path'] if c['path'] and not c['hit'] else ''})")
        if self.prompt_format == "plain":
            lines.append("prompts: plain text (the model has no chat template; give one with --chat-template FILE)")
        lines.append(head)
        lines += [_line(r) for r in self.rows]
        if self.merge is not None:
            lines.append(_line(self.merge))
        if self.localisation:
            lines.append("localisation (which stage lost it):")
            lines += [_line(r) for r in self.localisation]
        for r in self.rows + ([self.merge] if self.merge else []) + self.localisation:
            lines += _notes(r)
        if self.smallest_passing:
            lines.append(f"smallest passing quant: {self.smallest_passing}")
        lines += [f"verdict: {v}" for v in self.verdict]
        if self.calibration:
            c = self.calibration
            lines.append(f"calibration: {c.get('data')} ({c.get('samples')} samples); probes disjoint from it: "
                         f"{'yes' if c.get('disjoint') else 'not checked'}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _yn(v: Any) -> str:
    return "-" if v is None else ("ok" if v else "NO")


def _line(r: Row) -> str:
    """One table line: the verdict mark, the figures, the identity checks."""
    m, c = r.metrics, r.checks
    bos = f"{c.get('bos_reference', '?')}/{c.get('gguf_bos', c.get('bos_export', '?'))}"
    tmpl = c.get("template_identical")
    tmpl = tmpl and c.get("gguf_template_identical", True) if tmpl is not None else None
    cos = "-" if m.image_cos is None else f"{m.image_cos:.4f}"
    return (f"{'OK' if r.passed else 'XX':<3}{r.label[:20]:<21}{r.quant:<10}"
            f"{m.kl_mean:>10.2e}{m.kl_p99:>10.2e}{m.flip_rate:>7.1%}{m.top1:>7.1%}{m.kl_max:>9.2e}"
            f"{m.logit_diff_max:>8.3f}{m.greedy_match:>8.0%}{cos:>9}  {_yn(c.get('tokens_identical')):<4}"
            f"{_yn(tmpl):<5}{bos}")


def _notes(r: Row) -> list[str]:
    """A row's failures, its warnings and, when it failed, its worst position."""
    lines = [f"  {r.label}: {f}" for f in r.failures] + [f"  {r.label}: warning: {f}" for f in r.warnings]
    if r.failures and r.worst:
        w = r.worst
        lines.append(f"  {r.label}: worst position: probe {w['probe']} ({w['source']}) token {w['position']} "
                     f"{w['token']!r}: KL {w['kl']:.3g}, reference top-1 {w['ref_top1']!r}, export top-1 "
                     f"{w['export_top1']!r}")
    return lines


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, set):
        return sorted(o)
    return str(o)

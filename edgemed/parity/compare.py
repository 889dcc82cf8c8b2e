"""One comparison pass: every probe through the reference and each candidate runtime, summed into judged rows.

Candidates are opened with :func:`edgemed.backends.open_model` only; a pass takes folders, never makes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemed import prompting
from edgemed.backends import Backend, open_model
from edgemed.errors import ArtifactError, EdgemedError, ParityError
from edgemed.parity.metrics import Accumulator, RefLogits, bos_count, compare_logits, mean_cosine
from edgemed.parity.probes import Probe
from edgemed.parity.reference import GREEDY_TOKENS, CacheInfo, Turn, continuation_ids, reference_turns
from edgemed.parity.report import Row
from edgemed.parity.thresholds import DECIDED_MARGIN, SIZE_ORDER, Thresholds, judge, thresholds_for, warnings_for

# probes each candidate answers free-running: 10 keep the float bars' tolerance (f32 0.9: one answer of 10 may part,
# f16 0.75: two), and a greedy answer costs each candidate a decode step per token (docs/scale.md, Parity speed)
GREEDY_PROBES = 10


def candidates(folder: Path, manifest: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, quant type, open_model kwargs) for every file of an export folder."""
    kind = manifest.get("kind")
    if kind == "gguf":
        models = manifest.get("models") or {}
        if not models:
            raise ArtifactError(f"{folder}: its manifest lists no GGUF files ('models'); export it again")
        order = {q: i for i, q in enumerate(reversed(SIZE_ORDER))}
        return [(f"gguf {q}", q, {"quant": q}) for q in sorted(models, key=lambda q: order.get(q, 99))]
    if kind == "onnx":
        return [(f"onnx {manifest.get('quant', 'fp32')}", f"onnx-{manifest.get('quant', 'fp32')}", {})]
    if kind in ("model", "run"):
        return [(f"pytorch {folder.name}", "f32", {})]
    raise ArtifactError(f"{folder}: artifact kind {kind!r} cannot be checked; give a gguf, onnx or model folder")


@contextlib.contextmanager
def opened(folders: dict[str, tuple[Path, dict[str, Any]]]) -> Iterator[dict[str, Backend]]:
    """Open every folder (label -> (folder, open_model kwargs)); close them all on the way out.

    Several files of one GGUF folder share its tokenizer and processor, loaded once (``processing``): a
    262144-piece tokenizer takes seconds to load."""
    out: dict[str, Backend] = {}
    shared: dict[Path, tuple[Any, Any]] = {}
    try:
        for k, (folder, kw) in folders.items():
            key = Path(folder).resolve()
            if key in shared and "quant" in kw:
                kw = {**kw, "processing": shared[key]}
            out[k] = open_model(folder, **kw)
            if hasattr(out[k], "reuse_prefix"):
                out[k].reuse_prefix = True  # teacher-forced probes share the template's opening: run it once
            shared.setdefault(key, (out[k].processor, out[k].tokenizer))
        yield out
    finally:
        for b in out.values():
            with contextlib.suppress(Exception):
                b.close()


def greedy_probes(n: int, cap: int = GREEDY_PROBES) -> set[int]:
    """Which of ``n`` probes get a free-running greedy answer from each candidate: at most ``cap``, spread evenly
    over the set (validation questions, image probes and general prompts alike)."""
    return set(np.linspace(0, n - 1, min(n, cap)).round().astype(int).tolist()) if n else set()


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _parted(text: str, want: str) -> bool:
    """Whether an answer that starts with ``text`` can no longer equal ``want`` once both are stripped."""
    got = text.strip()
    return bool(got) and not want.strip().startswith(got)


@dataclass
class Reference:
    """The reference side of a parity run, shared by every pass: the open PyTorch model, the probes, and the
    settings each candidate is opened (``open_kw``) and judged (threshold ``overrides``) with.

    Its turns on the probes (answers, logits, image embeddings) are had once, from the cache or computed
    (:mod:`edgemed.parity.reference`), and serve every pass: the export's files, merge and localisation stages."""

    backend: Backend
    folder: Path
    probes: list[Probe]
    overrides: tuple[str, ...] | list[str] = ()
    open_kw: dict[str, Any] = field(default_factory=dict)
    _turns: list[Turn] | None = field(default=None, repr=False)
    cache: CacheInfo | None = None

    @property
    def bos(self) -> int | None:
        return getattr(getattr(self.backend, "tokenizer", None), "bos_token_id", None)

    @property
    def turns(self) -> list[Turn]:
        if self._turns is None:
            self._turns, self.cache = reference_turns(self.backend, self.folder, self.probes)
            # every comparison from here on reads these turns: the reference's weights (a 3B model's fp32 copy is
            # 15 GB) would only keep localisation's adapter model or fresh float export from fitting beside them
            release = getattr(self.backend, "release_weights", None)
            if release is not None:
                release()
        return self._turns

    @property
    def greedy(self) -> set[int]:
        """The probes whose free-running answers are compared."""
        return greedy_probes(len(self.probes))

    def piece(self, token: int) -> str:
        """The reference tokenizer's text of one token, for messages."""
        try:
            return self.backend.tokenizer.decode([int(token)])
        except Exception:  # noqa: BLE001 - only for messages; a runtime without a HF tokenizer shows the id
            return f"#{token}"

    # ------------------------------------------------------------ the pass
    def compare(self, cands: dict[str, Backend], pairs: dict[str, tuple[str, str]]
                ) -> tuple[dict[str, Accumulator], int]:
        """Run every probe through every candidate (probe-major, so only one probe's logits are held).

        ``pairs`` adds candidate-vs-candidate comparisons (e.g. "f16>q4_k_m": ("f16", "q4_k_m")) on the same tokens.
        Returns the accumulators (by candidate label and pair name) and the number of teacher-forced positions.
        """
        accs = {k: Accumulator() for k in [*cands, *pairs]}
        positions = 0
        ref_template = self.backend.chat_template()
        templates = {k: c.chat_template() for k, c in cands.items()}
        greedy = self.greedy
        for turn in self.turns:
            positions += len(turn.seq)
            ref = RefLogits.of(turn.logits)
            logits = {k: self._candidate(accs[k], k, c, turn, ref, templates[k] == ref_template,
                                         turn.index in greedy) for k, c in cands.items()}
            bases = {base: RefLogits.of(logits[base]) for base in {b for b, _ in pairs.values()}}
            for name, (base, other) in pairs.items():
                accs[name].add(compare_logits(bases[base], logits[other]), turn.index, turn.probe.source, turn.seq,
                               logits[base], logits[other], self.piece)
        return accs, positions

    def _candidate(self, a: Accumulator, label: str, c: Backend, t: Turn, ref: RefLogits, same_template: bool,
                   greedy: bool) -> np.ndarray:
        """One candidate on one probe: identity checks, teacher-forced figures, greedy answer (on the probes that
        get one), image cosine. Returns its logits (for the pairs)."""
        p, use_image = t.probe, t.image is not None
        try:
            cprompt = c.render(p.question, image=use_image, system=p.system)
        except EdgemedError as e:  # e.g. a text-only export asked an image question
            raise ParityError(f"{label}: cannot render probe {p.source}: {e}") from e
        a.template_same.append(cprompt == t.prompt and same_template)
        ctoks = c.tokenize(t.prompt)
        a.tokens_same.append(ctoks == t.tokens)
        if ctoks != t.tokens and not a.token_diff:
            j = _first_difference(ctoks, t.tokens)
            a.token_diff.append(f"probe {t.index} ({p.source}) token {j}: reference {t.tokens[j:j + 3]} export "
                                f"{ctoks[j:j + 3]}")
        a.bos.append((bos_count(t.tokens, self.bos), bos_count(c.tokenize(cprompt), self.bos)))
        lc = c.logits(t.seq, t.image)
        a.widths.add((t.logits.shape[-1], lc.shape[-1]))
        a.add(compare_logits(ref, lc), t.index, p.source, t.seq, t.logits, lc, self.piece)
        if greedy:
            self._greedy(a, c, cprompt, t)
        if t.embeddings is not None:
            ref_e = np.asarray(t.embeddings)
            emb = c.image_embeddings(t.image) if c.is_vision else np.zeros((0, ref_e.shape[-1]), np.float32)
            if emb.shape[0] != ref_e.shape[0] and not a.image_token_diff:
                a.image_token_diff.append(f"probe {t.index} ({p.source}), a {t.image.width}x{t.image.height} image: "
                                          f"reference {ref_e.shape[0]} image tokens, export {emb.shape[0]}")
            a.cos.append(mean_cosine(ref_e, emb))
        return lc

    def _greedy(self, a: Accumulator, c: Backend, cprompt: str, t: Turn) -> None:
        """The candidate's greedy answer against the reference's, at most GREEDY_TOKENS tokens. Once five
        divergences are on record, an answer is cut where it parts from the reference's (it can no longer match)."""
        from edgemed.backends.base import GenParams

        detail = len(a.first_divergence) < 5
        canswer = ""
        stream = c.stream(cprompt, image=t.image, params=GenParams(max_tokens=GREEDY_TOKENS, temperature=0.0))
        try:
            for chunk in stream:
                canswer += chunk.text
                if not detail and _parted(canswer, t.answer):
                    break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        a.greedy.append(canswer.strip() == t.answer.strip())
        if canswer.strip() != t.answer.strip() and detail:
            cids = continuation_ids(self.backend, t.prompt, t.tokens, canswer)
            rids = t.seq[len(t.tokens):]
            j = _first_difference(rids, cids)
            a.first_divergence.append({
                "probe": t.index, "source": t.probe.source, "token": j,
                "reference": self.piece(rids[j]) if j < len(rids) else "<end>",
                "export": self.piece(cids[j]) if j < len(cids) else "<end>",
                "reference_answer": t.answer[:80], "export_answer": canswer[:80]})

    def compare_folder(self, label: str, quant: str, runtime: str, folder: Path, kw: dict[str, Any]) -> Row:
        """Open one folder (``kw`` on top of ``open_kw``), compare it on every probe and judge it as ``quant``."""
        with opened({label: (folder, {**kw, **self.open_kw})}) as o:
            acc = self.compare(o, {})[0][label]
        return self.row(label, quant, runtime, acc)

    # ------------------------------------------------------------ judging
    def row(self, label: str, quant: str, runtime: str, a: Accumulator, pair: bool = False,
            judge_as: str | None = None) -> Row:
        """Figures of one accumulator, judged against the thresholds of ``judge_as`` (default ``quant``); each
        failure starts with its cause."""
        return judged_row(label, quant, runtime, a, thresholds_for(judge_as or quant, self.overrides), pair)


def judged_row(label: str, quant: str, runtime: str, a: Accumulator, th: Thresholds, pair: bool = False) -> Row:
    """Figures of one accumulator, judged against ``th``: identity failures (unless ``pair``), then the figures'."""
    m = a.metrics(DECIDED_MARGIN, pair)
    checks, fails = ({}, []) if pair else _identity(a)
    fails += judge(m, th, pair)
    if a.first_divergence:
        d = a.first_divergence[0]
        fails = [f + (f"; first divergence: probe {d['probe']} token {d['token']}, reference {d['reference']!r} vs "
                      f"export {d['export']!r}" if f.startswith("greedy:") else "") for f in fails]
    return Row(label, quant, runtime, m, checks, th, fails, a.worst, warnings_for(quant, m))


def _identity(a: Accumulator) -> tuple[dict[str, Any], list[str]]:
    """What the identity checks saw (template, token ids, BOS count, vocabulary width) and their failures."""
    bos_r = max((b[0] for b in a.bos), default=0)
    bos_e = max((b[1] for b in a.bos), default=0)
    checks = {"template_identical": all(a.template_same), "tokens_identical": all(a.tokens_same),
              "bos_reference": bos_r, "bos_export": bos_e, "vocab": sorted(a.widths),
              "image_tokens_identical": not a.image_token_diff}
    fails: list[str] = []
    if not all(a.template_same):
        fails.append(f"template: the chat template renders {a.template_same.count(False)}/{len(a.template_same)}"
                     " prompts differently from the reference (or its text differs); export the model's own "
                     "chat template")
    if not all(a.tokens_same):
        fails.append(f"tokenizer: token ids differ from the reference on the same text for "
                     f"{a.tokens_same.count(False)}/{len(a.tokens_same)} probes ({a.token_diff[0]})")
    if bos_e != bos_r:
        fails.append(f"bos: the export starts prompts with {bos_e} BOS token(s), the reference with {bos_r}"
                     + ("; a template that writes BOS plus a tokenizer that adds one doubles it"
                        if bos_e > bos_r else ""))
    if a.image_token_diff:
        fails.append(f"image: the export makes another number of image tokens than the reference "
                     f"({a.image_token_diff[0]}); its runtime sizes images otherwise than the model's processor")
    if any(r != c for r, c in a.widths):
        fails.append(f"vocab: logits widths differ (reference, export) {sorted(a.widths)}")
    return checks, fails


# ---------------------------------------------------------------- what a GGUF file carries
def gguf_file_checks(file: Path, ref: Backend, probes: list[Probe], bos_ref: int) -> tuple[dict[str, Any], list[str]]:
    """What a llama.cpp deployment that reads only the GGUF sees: its embedded chat template, rendered the way
    llama.cpp's servers render it (Jinja, trim/lstrip blocks), and its BOS rule (add_bos_token + the template's
    own BOS). The backend renders with the HF files beside the GGUF, so these are checked here, from the file."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from edgemed.gguf_header import read_header

    get = read_header(file).get

    template, add_bos = get("tokenizer.ggml.chat_template") or get("tokenizer.chat_template"), bool(
        get("tokenizer.ggml.add_bos_token"))
    tok = getattr(ref, "tokenizer", None)
    bos_id, eos_id = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    bos_text = tok.convert_ids_to_tokens(int(bos_id)) if tok is not None and bos_id is not None else None
    eos_text = tok.convert_ids_to_tokens(int(eos_id)) if tok is not None and eos_id is not None else ""
    checks: dict[str, Any] = {"gguf_template_identical": template == ref.chat_template(), "gguf_add_bos": add_bos}
    fails: list[str] = []
    if template is None and ref.chat_template() is None:  # a base model: plain prompts, only BOS to check
        checks["gguf_bos"] = int(add_bos)
        if checks["gguf_bos"] != bos_ref:
            fails.append(f"bos: {file.name} starts prompts with {checks['gguf_bos']} BOS token(s) "
                         f"(add_bos_token={add_bos}), the reference with {bos_ref}")
        return checks, fails
    if template is None:
        fails.append("template: the GGUF holds no tokenizer.chat_template; llama.cpp servers would fall back to a "
                     "built-in template; export the model's own chat template")
        return checks, fails
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def _raise(msg: str) -> None:
        raise ValueError(msg)

    env.globals["raise_exception"] = _raise
    texts = []
    for p in probes[:2] + [q for q in probes if q.image is not None][:1]:
        use_image = p.image is not None and ref.is_vision
        msgs = prompting.messages(p.question, image=use_image, system=p.system, typed=ref.is_vision)
        want = ref.render(p.question, image=use_image, system=p.system)
        try:
            got = env.from_string(template).render(messages=msgs, add_generation_prompt=True,
                                                   bos_token=bos_text or "", eos_token=eos_text)
        except Exception as e:  # noqa: BLE001 - any template error means the file's template is unusable
            got = f"<render error: {e}>"
        texts.append(got)
        if got != want:
            checks["gguf_template_identical"] = False
    if not checks["gguf_template_identical"]:
        fails.append(f"template: the chat template embedded in {file.name} differs from the reference's; llama.cpp "
                     "servers reading the GGUF would render other prompts; export the model's own template")
    lead = 0
    while bos_text and texts and texts[0][lead * len(bos_text):].startswith(bos_text):
        lead += 1
    # llama.cpp's chat rendering (common/chat.cpp, and llama-cpp-python's Jinja formatter, which then adds none)
    # drops one leading BOS the template wrote when add_bos_token is set, because the tokenizer adds it: a template
    # that opens with {{ bos_token }} (Gemma, Llama 3) gives one BOS either way
    checks["gguf_bos"] = max(lead, int(add_bos))
    if checks["gguf_bos"] != bos_ref:
        fails.append(f"bos: {file.name} starts prompts with {checks['gguf_bos']} BOS token(s) (template writes "
                     f"{lead}, add_bos_token={add_bos}), the reference with {bos_ref}"
                     + ("; BOS doubled: the template writes it more than once; export the model's own template"
                        if checks["gguf_bos"] > bos_ref else ""))
    return checks, fails

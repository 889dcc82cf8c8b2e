"""The reference side of a parity run: the PyTorch model's greedy answer, teacher-forced logits and image embeddings
for every probe, worked out once and kept on disk by content hash.

Every export, every quant and every auto-quant candidate is compared against the same reference, so its outputs are
cached under ``edgemed.paths.cache_root() / "parity-ref" / KEY``. KEY is the sha256 of everything the outputs depend
on: the reference's files (weights, config, tokenizer; a run's base too), the probes, their rendered prompts and
token ids (so the chat template and the tokenizer), the greedy length, the torch and transformers versions, the
dtype, the device and :data:`CACHE_FORMAT`. A warm run loads only the reference's tokenizer, never its weights.

What is kept is what the metrics read: the logits rows as the model gave them (float32). KL needs the whole
reference distribution and ``logit_diff_max`` every logit, so neither float16 nor top-k with a log-sum-exp would give
the same figures (float16 rounding alone is about the f32 export's KL bar). Entries are written whole and renamed,
built under a lock so two processes never build one, ignored and rebuilt when damaged, and the least recently used
are removed beyond ``EDGEMED_PARITY_CACHE_GB`` (default 16). ``EDGEMED_PARITY_CACHE=off`` keeps nothing;
``EDGEMED_PARITY_CACHE_DIR`` puts the cache elsewhere.

A cold reference runs batched: greedy answers of the text probes in left-padded batches and their logits in
right-padded ones (``TorchBackend.generate_batch`` / ``logits_batch``), equal to the one-at-a-time figures up to
float summation order; image probes go one at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemed.parity.probes import Probe

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what an entry holds, or how it is computed, changes
GREEDY_TOKENS = 16  # answers to the probes are short; 16 tokens show where two runtimes part
MEMO_MIN_BYTES = 64 << 20  # files this large are hashed once per (size, mtime, ctime, inode); smaller ones each run
_CHUNK_SEQS = 16  # teacher-forced sequences per logits_batch call (sorted by length; bounds the logits in memory)


@dataclass(frozen=True)
class Prompted:
    """One probe as the reference renders it: its image (when the reference takes it), prompt and token ids."""

    index: int
    probe: Probe
    image: Any
    prompt: str
    tokens: list[int]


@dataclass
class Turn:
    """What the reference did with one probe: its prompt, tokens, greedy answer and teacher-forced logits."""

    index: int
    probe: Probe
    image: Any  # the image when the reference takes it, else None
    prompt: str
    tokens: list[int]
    answer: str
    seq: list[int]  # prompt tokens + the answer's continuation ids
    logits: np.ndarray  # [len(seq), vocab] float32 (a read-only map of the cache file)
    embeddings: np.ndarray | None


@dataclass
class CacheInfo:
    """How the reference outputs were had: from the cache (``hit``) or computed, and where they are kept."""

    key: str
    hit: bool
    path: str | None
    forwards: dict[str, int] = field(default_factory=dict)  # reference model calls made by this run

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "hit": self.hit, "path": self.path, "forwards": self.forwards}


def prompted(backend: Any, probes: list[Probe]) -> list[Prompted]:
    """Render and tokenize every probe with the reference (its tokenizer only)."""
    out = []
    for i, p in enumerate(probes):
        image = p.load_image()
        image = image if image is not None and backend.is_vision else None
        prompt = backend.render(p.question, image=image is not None, system=p.system)
        out.append(Prompted(i, p, image, prompt, backend.tokenize(prompt)))
    return out


def reference_turns(backend: Any, folder: Path, probes: list[Probe]) -> tuple[list[Turn], CacheInfo]:
    """The reference's turn on every probe: from the cache when an entry for the same inputs exists, else computed
    (batched) under the entry's lock, stored and read back."""
    from edgemed.paths import cache_lock

    items = prompted(backend, probes)
    key = cache_key(backend, folder, items)
    if not cache_enabled():
        return _uncached(backend, items, key)
    root = cache_dir()
    entry = root / key
    turns = _load(entry, items)
    if turns is not None:
        _touch(entry)
        return turns, CacheInfo(key, True, str(entry))
    try:
        root.mkdir(parents=True, exist_ok=True)
        writable = os.access(root, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:  # a read-only cache folder: the run goes on without one
        log.warning("parity reference cache %s is not writable; computing the reference without it", root)
        return _uncached(backend, items, key)
    from edgemed.artifacts import atomic_dir

    with cache_lock(f"parity-ref-{key[:24]}"):
        turns = _load(entry, items)  # another process may have built it while this one waited
        if turns is not None:
            return turns, CacheInfo(key, True, str(entry))
        with atomic_dir(entry, overwrite=True) as tmp:
            forwards = _compute_into(tmp, backend, items, key)
    turns = _load(entry, items)
    if turns is None:
        raise RuntimeError(f"the parity reference cache entry {entry} just written does not read back")
    prune(root, keep=entry)
    return turns, CacheInfo(key, False, str(entry), forwards)


def cache_enabled() -> bool:
    return os.environ.get("EDGEMED_PARITY_CACHE", "on").strip().lower() not in ("0", "off", "no", "false")


def cache_dir() -> Path:
    """``$EDGEMED_PARITY_CACHE_DIR``, or ``parity-ref`` under edgemed's cache root."""
    from edgemed.paths import cache_root

    return Path(os.environ.get("EDGEMED_PARITY_CACHE_DIR") or cache_root() / "parity-ref")


def _uncached(backend: Any, items: list[Prompted], key: str) -> tuple[list[Turn], CacheInfo]:
    """Computed into a temporary folder that is gone once read (the maps keep the data until they are dropped)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgemed-parity-ref-"))
    try:
        forwards = _compute_into(tmp, backend, items, key)
        turns = _load(tmp, items)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert turns is not None
    return turns, CacheInfo(key, False, None, forwards)


# ---------------------------------------------------------------- the key
def cache_key(backend: Any, folder: Path, items: list[Prompted]) -> str:
    """sha256 of everything the reference's outputs depend on (see the module docstring)."""
    from importlib.metadata import version

    parts = {"format": CACHE_FORMAT, "files": files_sha(Path(folder)), "greedy_tokens": GREEDY_TOKENS,
             "torch": version("torch"), "transformers": version("transformers"),
             "dtype": str(getattr(backend, "dtype", None)), "device": str(getattr(backend, "device", None)),
             "eos": list(getattr(backend, "eos_ids", [])),
             "probes": [[p.probe.question, p.probe.system, image_sha(p.image), p.prompt, p.tokens] for p in items]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def image_sha(image: Any) -> str | None:
    """sha256 of an image's pixels (mode, size and bytes), None for no image."""
    if image is None:
        return None
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def files_sha(folder: Path) -> str:
    """One sha256 over the reference folder's files (manifest and checkpoints left out, as ``tree_sha256``), and
    for a run folder its base model's too. Large files are hashed once per stat (size, mtime, ctime, inode)."""
    from edgemed.manifest import kind_of

    memo = _Memo(cache_dir() / "sha-memo.json")
    h = hashlib.sha256()
    folders = [folder]
    if kind_of(folder) == "run":
        from edgemed.modeling import run_base

        folders.append(run_base(folder, check_hash=False))
    for n, root in enumerate(folders):  # where the folder lies is not part of it: a moved copy still hits
        h.update(f"folder {n}\n".encode())
        for p in sorted(Path(root).rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel != "manifest.json" and not rel.startswith("checkpoints/"):
                h.update(f"{rel}\0{memo.sha(p)}\n".encode())
    memo.save()
    return h.hexdigest()


class _Memo:
    """sha256 of large files by their stat, kept across runs in one JSON file (best effort)."""

    def __init__(self, path: Path):
        self.path, self.changed = path, False
        try:
            self.data: dict[str, list[Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def sha(self, p: Path) -> str:
        from edgemed.artifacts import sha256_file

        st = p.stat()
        if st.st_size < MEMO_MIN_BYTES:
            return sha256_file(p)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        k = str(p.resolve())
        got = self.data.get(k)
        if isinstance(got, list) and got[:4] == stamp:
            return str(got[4])
        digest = sha256_file(p)
        self.data[k], self.changed = [*stamp, digest], True
        return digest

    def save(self) -> None:
        if not self.changed or not cache_enabled():
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
        except OSError:  # a memo that cannot be kept only costs the next run a hash
            pass


# ---------------------------------------------------------------- computing an entry
def _compute_into(folder: Path, backend: Any, items: list[Prompted], key: str) -> dict[str, int]:
    """Answers, teacher-forced logits and image embeddings of every probe, written into ``folder`` (meta.json,
    logits.npy, embeddings.npy). Returns the calls made to the model, by kind."""
    calls = {"generate": 0, "logits": 0, "image_embeddings": 0}
    answers = _answers(backend, items, calls)
    seqs = [p.tokens + continuation_ids(backend, p.prompt, p.tokens, answers[p.index]) for p in items]
    offsets = np.cumsum([0, *map(len, seqs)]).tolist()
    logits = None
    text = sorted((p.index for p in items if p.image is None), key=lambda i: len(seqs[i]))
    batch = getattr(backend, "logits_batch", None)
    todo: list[list[int]] = [text[k:k + _CHUNK_SEQS] for k in range(0, len(text), _CHUNK_SEQS)] if batch else []
    todo += [[p.index] for p in items if p.image is not None or not batch]
    for chunk in todo:
        if batch and items[chunk[0]].image is None:
            rows = batch([seqs[i] for i in chunk])
        else:
            rows = [backend.logits(seqs[i], items[i].image) for i in chunk]
        calls["logits"] += 1
        for i, r in zip(chunk, rows, strict=True):
            if logits is None:
                logits = np.lib.format.open_memmap(folder / "logits.npy", "w+", np.float32, (offsets[-1], r.shape[-1]))
            logits[offsets[i]:offsets[i + 1]] = r
    assert logits is not None
    logits.flush()
    del logits
    embeddings, emb_rows = _embeddings(backend, items, calls)
    if embeddings:
        np.save(folder / "embeddings.npy", np.concatenate(embeddings).astype(np.float32))
    meta = {"format": CACHE_FORMAT, "key": key,
            "probes": [{"prompt": p.prompt, "tokens": p.tokens, "answer": answers[p.index], "seq": seqs[p.index],
                        "rows": [offsets[p.index], offsets[p.index + 1]], "embeddings": emb_rows.get(p.index)}
                       for p in items]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return calls


def _answers(backend: Any, items: list[Prompted], calls: dict[str, int]) -> dict[int, str]:
    from edgemed.backends.base import GenParams

    params = GenParams(max_tokens=GREEDY_TOKENS, temperature=0.0)
    out: dict[int, str] = {}
    batch = getattr(backend, "generate_batch", None)
    text = [p for p in items if p.image is None]
    if batch is not None and text:
        out.update(zip((p.index for p in text), batch([p.prompt for p in text], params), strict=True))
        calls["generate"] += 1
    for p in items:
        if p.index not in out:
            out[p.index] = "".join(backend.generate(p.prompt, image=p.image, params=params))
            calls["generate"] += 1
    return out


def continuation_ids(backend: Any, prompt: str, tokens: list[int], text: str) -> list[int]:
    full = backend.tokenize(prompt + text)
    return full[len(tokens):] if full[:len(tokens)] == tokens else []


def _embeddings(backend: Any, items: list[Prompted], calls: dict[str, int]
                ) -> tuple[list[np.ndarray], dict[int, list[int]]]:
    """Projected image features of the image probes (none where the family has none to compare: Mllama feeds the
    image through cross-attention, so no image tokens reach the decoder's input; its logits still cover it)."""
    arrays: list[np.ndarray] = []
    rows: dict[int, list[int]] = {}
    start = 0
    for p in items:
        if p.image is None:
            continue
        calls["image_embeddings"] += 1
        try:
            e = backend.image_embeddings(p.image)
        except (AttributeError, NotImplementedError):
            continue
        if e is None:
            continue
        e = np.asarray(e, np.float32).reshape(-1, np.shape(e)[-1])
        if arrays and e.shape[-1] != arrays[0].shape[-1]:
            raise ValueError("image embeddings of different widths from one model")
        arrays.append(e)
        rows[p.index] = [start, start + len(e)]
        start += len(e)
    return arrays, rows


# ---------------------------------------------------------------- reading an entry
def _load(entry: Path, items: list[Prompted]) -> list[Turn] | None:
    """The turns kept in ``entry``, or None when it is missing or does not hold what these probes need (a damaged
    entry is said and then rebuilt)."""
    if not (entry / "meta.json").is_file():
        return None
    try:
        return _read(entry, items)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("parity reference cache entry %s is damaged (%s); computing it again", entry, e)
        return None


def _read(entry: Path, items: list[Prompted]) -> list[Turn]:
    meta = json.loads((entry / "meta.json").read_text())
    if meta.get("format") != CACHE_FORMAT or len(meta["probes"]) != len(items):
        raise ValueError(f"format {meta.get('format')} with {len(meta['probes'])} probes")
    logits = np.load(entry / "logits.npy", mmap_mode="r")
    emb = np.load(entry / "embeddings.npy", mmap_mode="r") if (entry / "embeddings.npy").is_file() else None
    if logits.dtype != np.float32 or logits.ndim != 2:
        raise ValueError(f"logits of {logits.dtype} {logits.shape}")
    turns, end = [], 0
    for p, m in zip(items, meta["probes"], strict=True):
        a, b = m["rows"]
        if m["prompt"] != p.prompt or m["tokens"] != p.tokens or m["seq"][:len(p.tokens)] != p.tokens \
                or a != end or b - a != len(m["seq"]) or b > len(logits):
            raise ValueError(f"probe {p.index} does not match what was stored")
        e = None
        if m["embeddings"] is not None:
            ea, eb = m["embeddings"]
            if emb is None or not 0 <= ea < eb <= len(emb):
                raise ValueError(f"probe {p.index}: image embeddings missing")
            e = emb[ea:eb]
        turns.append(Turn(p.index, p.probe, p.image, p.prompt, p.tokens, m["answer"], m["seq"], logits[a:b], e))
        end = b
    if end != len(logits):
        raise ValueError(f"{len(logits)} logits rows for {end} positions")
    return turns


def _touch(entry: Path) -> None:
    try:
        os.utime(entry / "meta.json")  # least recently used goes first when pruning
    except OSError:
        pass


def prune(root: Path, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries while the cache holds more than ``EDGEMED_PARITY_CACHE_GB``;
    returns those removed."""
    try:
        cap = float(os.environ.get("EDGEMED_PARITY_CACHE_GB", "16")) * (1 << 30)
    except ValueError:
        cap = 16.0 * (1 << 30)
    entries = []
    for d in root.iterdir() if root.is_dir() else []:
        meta = d / "meta.json"
        if d.is_dir() and not d.name.startswith(".") and meta.is_file():
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            entries.append((meta.stat().st_mtime, size, d))
    total = sum(s for _, s, _ in entries)
    removed = []
    for _, size, d in sorted(entries, key=lambda e: e[0]):
        if total <= cap:
            break
        if keep is not None and d.resolve() == keep.resolve():
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= size
        removed.append(d)
    return removed

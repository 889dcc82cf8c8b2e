"""Deployable bundles: an export folder that carries everything needed to check it before it serves.

A bundle is an export folder (GGUF or ONNX) with its model files, mmproj, tokenizer and chat template, a model
card (``README.md``), the parity and eval reports, and a sealed manifest holding the sha256 of every file and the
lineage: base model, adapter (run), data and recipe hashes. ``verify`` recomputes all of it and names every file
that does not match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgemed.artifacts import MANIFEST, file_hashes, read_manifest, save_manifest, sha256_file
from edgemed.errors import ArtifactError
from edgemed.manifest import Manifest, base_of, read_raw, seal
from edgemed.manifest import lineage as walk

CARD = "README.md"


def lineage(folder: Path) -> dict[str, Any]:
    """What an artifact was made from, for its bundle: the adapter run, the merged model, the base model, the data
    and the recipe's sha256 (``edgemed.manifest.lineage`` walks the parents)."""
    try:
        chain = walk(folder)
    except ArtifactError:
        return {}
    out: dict[str, Any] = {}
    run = next((m for m in chain if m.kind == "run"), None)
    if run is not None:
        out["adapter"] = _entry(run)
        out["recipe_sha256"] = _json_sha(run.recipe)
        out["data"] = run.data
    merged = next((m for m in chain if m.kind == "model" and m.parent is not None and m.parent.kind == "run"), None)
    if merged is not None:
        out["merged_model"] = _entry(merged)
    base = base_of(chain)
    if base is not None:
        out["base_model"] = base.model_dump()
    return out


def _entry(m: Manifest) -> dict[str, Any]:
    return {"path": str(m.folder), "kind": m.kind, "seal": m.seal}


def _json_sha(obj: Any) -> str | None:
    import hashlib

    if obj is None:
        return None
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def model_card(manifest: dict[str, Any], reports: dict[str, Any]) -> str:
    """A short Markdown model card from the manifest and the parity/eval reports."""
    lin = manifest.get("lineage", {})
    base = lin.get("base_model") or {}
    base_name = base.get("id") or base.get("name") or base.get("path")
    quants = ", ".join(manifest.get("quants", []) or [str(manifest.get("quant"))])
    lines = [f"# {manifest.get('name', 'edgemed export')}", "",
             f"Format: **{manifest.get('kind')}** ({quants})",
             f"Architecture: {manifest.get('arch')}",
             f"Base model: {base_name} (sha256 {str(base.get('sha256'))[:16]}…)",
             f"Adapter run: {(lin.get('adapter') or {}).get('path')}",
             f"Recipe sha256: {lin.get('recipe_sha256')}", "",
             "## Checks", ""]
    for name, rep in reports.items():
        lines.append(f"- {name}: {rep}")
    lines += ["", "Run `edgemed verify <this folder>` before deployment: it checks every file against the sealed "
              "manifest. `edgemed serve` does so before it loads.", "",
              "Intended use: research and decision support under clinical supervision; not a medical device."]
    return "\n".join(lines) + "\n"


def finalize(folder: Path | str, reports: dict[str, Path] | None = None, summary: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Make an export folder a bundle: copy reports in, add lineage and a model card, re-hash and seal."""
    folder = Path(folder)
    manifest = read_manifest(folder, ("gguf", "onnx"))
    for name, src in (reports or {}).items():
        (folder / name).write_bytes(Path(src).read_bytes())
    manifest["lineage"] = lineage(folder)
    (folder / CARD).write_text(model_card(manifest, summary or {}))
    manifest["files"] = file_hashes(folder)
    return save_manifest(folder, manifest)


PARITY_REPORT = "parity.json"  # the name finalize gives the parity report it copies in


def parity_drift(folder: Path | str) -> str | None:
    """A sentence when the bundle's parity report holds for another build of its runtime than this machine's."""
    from edgemed.machine import runtime_drift

    folder = Path(folder)
    path = folder / PARITY_REPORT
    try:
        kind = read_raw(folder).get("kind")
        report = json.loads(path.read_text()) if path.is_file() else None
    except (ArtifactError, OSError, ValueError):
        return None  # verify() names a damaged bundle; this note is only about the runtime build
    runtime = {"gguf": "llama_cpp", "onnx": "onnxruntime"}.get(kind or "")
    if not isinstance(report, dict) or runtime is None:
        return None
    drift = runtime_drift(report, runtime)
    return f"{folder}: {drift}" if drift else None


def verify(folder: Path | str) -> list[str]:
    """Every problem with a bundle, one line each naming the file; an empty list means it checks out."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return [f"{path}: missing; this folder is not an edgemed bundle"]
    try:
        manifest = read_raw(folder)  # as written: the seal covers the file's own content
    except ArtifactError as e:
        return [str(e)]
    problems = []
    if manifest.get("seal") != seal(manifest):
        problems.append(f"{path}: edited after it was sealed (seal does not match its contents)")
    listed = manifest.get("files") or {}
    if not isinstance(listed, dict):
        return problems + [f"{path}: 'files' is not a mapping of file names to sha256"]
    if not listed:
        problems.append(f"{path}: lists no files")
    for rel, digest in sorted(listed.items()):
        p = folder / rel
        if not p.is_file():
            problems.append(f"{p}: missing (listed in the manifest)")
        elif sha256_file(p) != digest:
            problems.append(f"{p}: sha256 differs from the manifest (changed or corrupted)")
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in listed:
            problems.append(f"{p}: not in the manifest (added after export)")
    return problems

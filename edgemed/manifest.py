"""Manifests: what every run, model and export folder says about itself, read, upgraded and walked here only.

Each kind has a typed model (run, model, gguf, onnx; an adapter export is a gguf folder with ``adapters``,
``adapter`` and ``binding`` set). Fields a writer adds beyond these are kept (``extra="allow"``); the references
edgemed itself resolves are fixed: ``base_model`` is always a :class:`BaseRef` (path, sha256, id, name,
model_type) and ``parent`` a :class:`ParentRef`. Manifests of older shapes go through :func:`upgrade` on every
read and write, so no caller sees a shape but the current one. :func:`parent` and :func:`lineage` are the one
walk from an artifact back to what it was made from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError

from edgemed.errors import ArtifactError
from edgemed.files import read_json

MANIFEST = "manifest.json"
KINDS = ("run", "model", "gguf", "onnx")
SCHEMA = 2  # 2: base_model is a BaseRef everywhere (1: a name string plus base_model_sha256 in GGUF manifests)
_DAMAGED = "the folder is damaged, make it again"


class BaseRef(BaseModel):
    """The base checkpoint an artifact descends from; every manifest that names one names it in this shape."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    sha256: str | None = None  # edgemed.artifacts.tree_sha256 of the base folder
    id: str | None = None  # the public checkpoint (recipe model.id)
    name: str | None = None  # what GGUF's general.base_model.0.name records
    model_type: str | None = None


class ParentRef(BaseModel):
    """The artifact this one was made from (a run's base, a merge's run, an export's model folder)."""

    model_config = ConfigDict(extra="allow")

    kind: str | None = None
    path: str | None = None
    name: str | None = None
    tree_sha256: str | None = None
    manifest: dict[str, Any] | str | None = None  # the source manifest's sha256, kind and files ("no manifest")


class Manifest(BaseModel):
    """Fields every kind has; ``folder`` is where it was read from (None for one not read from disk)."""

    model_config = ConfigDict(extra="allow")

    edgemed_manifest: int = SCHEMA
    kind: str
    created: str | None = None
    libraries: dict[str, str] = {}
    name: str | None = None
    arch: str | None = None
    base_model: BaseRef | None = None
    parent: ParentRef | None = None
    files: dict[str, str] | None = None
    seal: str | None = None
    _folder: Path | None = PrivateAttr(None)

    @property
    def folder(self) -> Path | None:
        return self._folder

    def to_dict(self) -> dict[str, Any]:
        """The manifest as callers that index it by key want it: the fields the file holds, current shape."""
        return self.model_dump(mode="json", exclude_unset=True)


class _Trained(Manifest):
    """What a fine-tune was made with; a merge carries its run's."""

    recipe: dict[str, Any] | None = None  # the resolved recipe
    data: dict[str, Any] | None = None  # per stage: train file, its dataset_sha256, validation file


class RunManifest(_Trained):
    """``edgemed finetune``: adapters and trained tensors over ``base_model``."""

    kind: Literal["run"]
    method: dict[str, Any] | None = None
    trainable: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    seconds: float | None = None


class ModelManifest(_Trained):
    """A full checkpoint: ``edgemed merge`` output, or an embedded model."""

    kind: Literal["model"]
    merge: dict[str, Any] | None = None
    origin: dict[str, Any] | None = None
    weights: dict[str, Any] | None = None
    license: str | None = None
    build: int | None = None


class GGUFManifest(Manifest):
    """``edgemed export gguf``; from a run folder it also holds a LoRA adapter file (adapters, adapter, binding)."""

    kind: Literal["gguf"]
    gguf_arch: str | None = None
    quants: list[str] = []
    models: dict[str, str] = {}
    mmproj: str | None = None
    mmproj_quant: str | None = None
    image_placeholder: str | None = None
    image_token_id: int | None = None
    calibration: dict[str, Any] | None = None
    adapters: dict[str, str] | None = None
    adapter: dict[str, Any] | None = None
    binding: dict[str, Any] | None = None
    machine: str | None = None
    lineage: dict[str, Any] | None = None


class OnnxManifest(Manifest):
    """``edgemed export onnx``: one folder per quant, its graphs by role (decoder, vision, embed)."""

    kind: Literal["onnx"]
    quant: str | None = None
    options: dict[str, Any] = {}
    graphs: dict[str, Any] = {}
    calibration: dict[str, Any] | None = None
    machine: str | None = None
    lineage: dict[str, Any] | None = None


AnyManifest = Annotated[RunManifest | ModelManifest | GGUFManifest | OnnxManifest, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyManifest)


# ---------------------------------------------------------------------------------------------- old shapes
def base_ref(value: Any, sha256: str | None = None) -> dict[str, Any] | Any:
    """``base_model`` in the one shape: a dict of every BaseRef field. A name string (schema 1 GGUF manifests,
    with its sha256 beside it) becomes ``name``; a path without a name is named after its last part."""
    if isinstance(value, BaseRef):
        value = value.model_dump()
    if isinstance(value, str | Path):
        value = {"name": str(value)}
    elif value is None:
        value = {}
    elif not isinstance(value, dict):
        return value  # validation names the wrong type
    out = {k: None for k in BaseRef.model_fields} | value
    if sha256 and not out["sha256"]:
        out["sha256"] = sha256
    if not out["name"] and out["path"]:
        out["name"] = Path(str(out["path"])).name
    return out


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A manifest of any schema edgemed has written, in the current shape (the input is left unchanged).

    Schema 1 GGUF manifests held ``base_model`` as a name with ``base_model_sha256`` beside it; merges recorded
    their parent's hash as ``parent.sha256``.
    """
    m = dict(raw)
    version = m.get("edgemed_manifest", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA:
        raise ArtifactError(f"manifest schema {version} is newer than this edgemed reads ({SCHEMA}); upgrade "
                            "edgemed (pip install -U edgemed)")
    sha = m.pop("base_model_sha256", None)
    if m.get("base_model") is not None or sha:
        m["base_model"] = base_ref(m.get("base_model"), sha)
    parent = m.get("parent")
    if isinstance(parent, dict) and "sha256" in parent:
        parent = dict(parent)
        moved = parent.pop("sha256")
        parent.setdefault("tree_sha256", moved)
        m["parent"] = parent
    m["edgemed_manifest"] = SCHEMA
    return m


def validate(raw: dict[str, Any], where: str | Path = "manifest") -> Manifest:
    """The typed manifest of ``raw`` (upgraded first); every wrong field named at once in one ArtifactError."""
    data = upgrade(raw)
    kind = data.get("kind")
    if kind not in KINDS:
        raise ArtifactError(f"{where}: kind {kind!r} is not one edgemed writes ({', '.join(KINDS)}); {_DAMAGED}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise ArtifactError(f"{where}: {_problems(e)}; {_DAMAGED}") from None


def _problems(e: ValidationError) -> str:
    out = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]][1:]  # the first item is the kind's tag
        field = "'" + ".".join(loc) + "'" if loc else "(top level)"
        got = json.dumps(err.get("input"), default=str)[:40]
        out.append(f"{field} {err['msg'][0].lower()}{err['msg'][1:]} (got {got})")
    return "; ".join(out)


# ---------------------------------------------------------------------------------------------- read, write
def read_raw(folder: Path | str) -> dict[str, Any]:
    """``manifest.json`` as written (seal checks need the very bytes' content); ArtifactError if unreadable."""
    return read_json(Path(folder) / MANIFEST, "an edgemed manifest", todo=_DAMAGED)


def load(folder: Path | str, kinds: tuple[str, ...] | None = None, complete: bool = True) -> Manifest:
    """The typed manifest of an edgemed folder, checked to be of one of ``kinds`` and, with ``complete``, to have
    every file it lists: a folder that lost part of itself (a run without its adapter) is refused rather than used
    as if the part had never been made."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such folder; give the folder that edgemed wrote")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{folder}: no {MANIFEST}; this is not a folder written by edgemed "
            "(run `edgemed finetune`, `edgemed merge` or `edgemed export` to make one)"
        )
    raw = read_raw(folder)
    if kinds and raw.get("kind") not in kinds:
        raise ArtifactError(f"{folder}: is a {raw.get('kind')!r} folder, expected {' or '.join(kinds)}")
    m = validate(raw, path)
    m._folder = folder
    if complete and m.files:
        _check_complete(folder, m.files)
    return m


def _check_complete(folder: Path, listed: dict[str, str]) -> None:
    missing = sorted(rel for rel in listed if not (folder / rel).is_file())
    if missing:
        one = len(missing) == 1
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ArtifactError(
            f"{folder}: incomplete: {', '.join(missing[:3])}{more} listed in its {MANIFEST} "
            f"{'is' if one else 'are'} missing; restore {'it' if one else 'them'} or make the folder again")


def find(folder: Path | str | None, complete: bool = False) -> Manifest | None:
    """The manifest of ``folder``, or None where it is not an edgemed folder (gone, or a plain transformers or
    hub folder without ``manifest.json``); a damaged manifest is an ArtifactError."""
    if folder is None or not (Path(folder) / MANIFEST).is_file():
        return None
    return load(folder, complete=complete)


def kind_of(folder: Path | str) -> str | None:
    """The artifact kind of ``folder``; None for a folder without a manifest."""
    m = find(folder)
    return m.kind if m is not None else None


def seal(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its seal: an edited manifest no longer matches."""
    body = {k: v for k, v in manifest.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def save(folder: Path | str, manifest: dict[str, Any] | Manifest) -> dict[str, Any]:
    """Upgrade, validate, seal and write ``manifest`` as ``folder/manifest.json`` (atomically); returns what was
    written. A writer passing a field of the wrong type fails here, not in the reader that meets it later."""
    folder = Path(folder)
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
    raw = json.loads(json.dumps(manifest, default=_plain))
    try:
        body = validate(raw, folder / MANIFEST).to_dict()
    except ArtifactError as e:  # a writer's mistake, not the user's folder
        raise ValueError(str(e).removesuffix(f"; {_DAMAGED}")) from None
    body.pop("seal", None)
    body["seal"] = seal(body)
    tmp = folder / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return body


def _plain(obj: Any) -> Any:
    """JSON for what writers pass: references as their fields, paths and the rest as text."""
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else str(obj)


# ---------------------------------------------------------------------------------------------- the walk
def parent(m: Manifest) -> Manifest | None:
    """The manifest of the artifact ``m`` was made from; None where it names none or that folder holds no
    manifest (a plain transformers folder, a hub checkpoint, or gone). Its own missing files do not matter here:
    the walk reads what it says, not what it holds."""
    path = m.parent.path if m.parent is not None else None
    return find(path) if path else None


def lineage(start: Manifest | Path | str) -> list[Manifest]:
    """``start`` and every artifact it descends from, nearest first. The walk ends at the first ancestor that is
    not an edgemed folder or cannot be read (an ancestor's damage is not this artifact's), or at a loop."""
    m = start if isinstance(start, Manifest) else load(start, complete=False)
    chain: list[Manifest] = []
    seen: set[Path] = set()
    while m is not None:
        where = m.folder.resolve() if m.folder is not None else None
        if where in seen:
            break
        seen.add(where)  # type: ignore[arg-type]
        chain.append(m)
        try:
            m = parent(m)
        except ArtifactError:
            break
    return chain


def run_of(start: Manifest | Path | str | None) -> RunManifest | None:
    """The nearest training run in ``start``'s lineage (itself, when it is one); None for a folder without a
    manifest or an artifact that no run made."""
    if start is None or (not isinstance(start, Manifest) and find(start) is None):
        return None
    return next((m for m in lineage(start) if isinstance(m, RunManifest)), None)


def run_behind(*folders: Path | str | None) -> RunManifest | None:
    """The run behind the first of ``folders`` that has one (parity: the adapter, else the reference)."""
    return next((r for f in folders if (r := run_of(f)) is not None), None)


def base_of(chain: Manifest | Iterable[Manifest]) -> BaseRef | None:
    """The base model of a lineage: the nearest reference with a sha256 (else the nearest at all), its empty
    fields filled from the others that name the same base."""
    chain = lineage(chain) if isinstance(chain, Manifest) else list(chain)
    refs = [m.base_model for m in chain if m.base_model is not None]
    if not refs:
        return None
    first = next((r for r in refs if r.sha256), refs[0])
    same = [first, *(r for r in refs if r.sha256 in (None, first.sha256))]
    return BaseRef(**{k: next((getattr(r, k) for r in same if getattr(r, k)), None) for k in BaseRef.model_fields})

"""Output folders that describe themselves, and that are never half-written.

Every run, model and export folder holds ``manifest.json``: what kind of artifact it is, the resolved recipe,
the base model path and sha256, data sha256, library versions, the parent artifact, and the sha256 of every
file in it; ``edgemed.manifest`` types, upgrades and walks them. Folders are written under a temporary name
beside the target and renamed when complete, so a killed command never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from edgemed.errors import ArtifactError
from edgemed.manifest import KINDS, MANIFEST, SCHEMA, load, save, seal

_LIBS = ("edgemed", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "gguf", "llama_cpp_python",
         "onnx", "onnxruntime", "numpy")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of one file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file below ``folder`` (relative posix path -> hex), manifest excluded."""
    out: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip and not rel.startswith("checkpoints/"):
            out[rel] = sha256_file(p)
    return out


def tree_sha256(path: Path) -> str:
    """One sha256 for a file, or for a folder (over its sorted file names and their hashes)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for rel, digest in file_hashes(path).items():
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide what an artifact contains."""
    out = {}
    for name in _LIBS:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(folder: Path, kind: str, *, hash_files: bool = True, **fields: Any) -> dict[str, Any]:
    """Write ``manifest.json`` into ``folder``; with ``hash_files`` it lists the sha256 of every file.

    ``base_model`` may be given in any shape edgemed has written (a BaseRef dict, or a name with
    ``base_model_sha256`` beside it); it is written in the one shape, ``edgemed.manifest.BaseRef``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    manifest = {
        "edgemed_manifest": SCHEMA,
        "kind": kind,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "libraries": library_versions(),
        **fields,
    }
    if kind in ("gguf", "onnx"):  # the machine that made an export (the doctor's one line)
        from edgemed.machine import machine_summary

        manifest.setdefault("machine", machine_summary())
    if hash_files:
        manifest["files"] = file_hashes(folder)
    return save_manifest(folder, manifest)


manifest_seal = seal


def save_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Seal and write ``manifest`` as ``folder/manifest.json`` (atomically, in the current shape)."""
    return save(folder, manifest)


def read_manifest(folder: Path | str, kinds: tuple[str, ...] | None = None, complete: bool = True
                  ) -> dict[str, Any]:
    """An artifact's manifest as a dict in the current shape (see ``edgemed.manifest.load`` for the checks: it
    exists, is of one of ``kinds`` and, with ``complete``, every file it lists is present)."""
    return load(folder, kinds, complete).to_dict()


def source_manifest(model_dir: Path | str) -> dict[str, Any] | None:
    """The manifest of a folder an exporter reads (None for a plain transformers folder), checked complete and of
    kind "model": a run holds adapters only, and an export is not an exporter's input."""
    from edgemed.errors import ExportError

    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST).is_file():
        return None
    manifest = load(model_dir)
    if manifest.kind == "run":
        raise ExportError(f"{model_dir}: is a training run folder (adapters only); run `edgemed merge {model_dir} "
                          "--out MODEL_DIR` and export MODEL_DIR")
    if manifest.kind != "model":
        raise ExportError(f"{model_dir}: is a {manifest.kind!r} folder; export takes a merged model folder (kind "
                          "'model')")
    return manifest.to_dict()


@contextlib.contextmanager
def atomic_dir(target: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` only if the block completes.

    An existing ``target`` is an error unless ``overwrite``; then it is replaced only after the new folder
    is complete.
    """
    target, tmp = _claim(target, overwrite)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _plain_modes(tmp)
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def _claim(target: Path | str, overwrite: bool) -> tuple[Path, Path]:
    """``target`` made absolute and checked (exists without ``overwrite``, parent not writable), dead partials of
    it swept, and the temporary name beside it."""
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise ArtifactError(f"{target} already exists; choose another --out or pass --overwrite")
    _writable_parent(target)
    sweep_dead(target)
    return target, target.parent / f".{target.name}.partial-{os.getpid()}"


def _plain_modes(folder: Path) -> None:
    """Give every file the mode a plain create gets: some writers (torch.onnx's external data) go through a private
    temporary file (0600), which a service account serving the folder could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


@contextlib.contextmanager
def atomic_file(target: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; rename it to ``target`` only if the block completes."""
    target, tmp = _claim(target, overwrite)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def _writable_parent(target: Path) -> None:
    """Create ``target``'s parent folder, refusing one that cannot be written before any work starts."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"{target}: cannot create its folder {target.parent} ({e.strerror or e}); choose an "
                            "--out in a writable folder") from None
    if not target.parent.is_dir():
        raise ArtifactError(f"{target}: {target.parent} is not a folder; choose another --out")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"{target}: the folder {target.parent} is not writable; choose an --out in a writable "
                            "folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: keep its folder
    return True


def sweep_dead(target: Path) -> list[Path]:
    """Remove the debris of killed writers of ``target``: ``.NAME.partial-PID`` and ``.NAME.old-PID`` whose
    process is gone (a live writer's folder, or this process's own, is left alone). Returns what was removed."""
    removed = []
    for p in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = p.name[len(target.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed

"""Hostile inputs, one row per class of bad input, across every surface: recipes, data JSONL, images and DICOM, run
folders, checkpoints, GGUF/ONNX bundles, manifests, the command line and the HTTP API.

Each CLI row asserts the exit code, one error line naming the problem, no traceback, no output left that looks
complete (no --out folder, no partial folder), and its inputs unchanged byte for byte. Each HTTP row asserts the
status and error code, and that the server still answers. Property-based tests (hypothesis) feed arbitrary bytes to
the record readers and the request schema: a clean error or a valid record, never an escaping exception.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import write_vqa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgemed.cli import main
from edgemed.errors import DataError, EdgemedError

QUESTION = "Is there a lesion?"


# ---------------------------------------------------------------------------------------------- shared fixtures
@dataclass
class Fx:
    """What the rows break copies of: a tiny model, a 1-step run, its merge and its GGUF export."""

    root: Path
    model: Path
    other: Path  # the same architecture, other weights
    run: Path
    merged: Path
    gguf: Path
    data: Path


@pytest.fixture(scope="module")
def fx(tiny_model, tmp_path_factory) -> Fx:
    from edgemed.export.gguf import export_gguf
    from edgemed.merge import merge
    from edgemed.recipe import Recipe
    from edgemed.train import finetune

    root = tmp_path_factory.mktemp("hostile")
    model = tiny_model("llama")
    data = write_vqa(root / "data", n=4, image=False)
    recipe = Recipe.model_validate({
        "model": {"path": str(model)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": "nonzero"},
        "optim": {"batch_size": 2}, "stages": [{"name": "s", "data": {"train": str(data)}, "max_steps": 1}]})
    run = finetune(recipe, root / "run")
    merged = merge(run, root / "merged", check=False)
    gguf = export_gguf(merged, ["f16"], root / "gguf")
    return Fx(root, model, tiny_model("llama", seed=3), run, merged, gguf, data)


def copy(src: Path, tmp: Path, name: str | None = None) -> Path:
    return Path(shutil.copytree(src, tmp / (name or src.name), symlinks=True))


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) below ``folder``, ``skip`` left out."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        rel = p.relative_to(folder).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir"
    return out


# ---------------------------------------------------------------------------------------------- CLI rows
@dataclass
class Case:
    argv: list[str]
    needles: tuple[str, ...]  # all must appear in the error line (case-insensitive)
    code: int = 2
    out: Path | None = None  # must not exist afterwards, nor any partial folder beside it
    prefix: str = "error: "
    subprocess: bool = False  # run `python -m edgemed.cli` (for commands that would serve if they did not fail)


def recipe_file(tmp: Path, fx: Fx, doc: dict | None = None, text: str | bytes | None = None, **data) -> Path:
    p = tmp / "recipe.yaml"
    if text is not None:
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p
    base = {"model": {"path": str(fx.model)}, "optim": {"batch_size": 2},
            "stages": [{"name": "s", "data": {"train": str(data.pop("train", fx.data)), **data}, "max_steps": 1}]}
    p.write_text(yaml.safe_dump({**base, **(doc or {})}))
    return p


def ft(tmp: Path, recipe: Path, *extra: str) -> list[str]:
    return ["finetune", str(recipe), "--out", str(tmp / "out"), *extra]


def jsonl(tmp: Path, content: bytes | str | list, name: str = "train.jsonl") -> Path:
    folder = tmp / "d"
    folder.mkdir(exist_ok=True)
    p = folder / name
    if isinstance(content, list):
        content = "\n".join(json.dumps(r) for r in content) + "\n"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def png(path: Path, size: int = 16) -> Path:
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(path)
    return path


def dicom(path: Path, pixels: bool = True) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientID = "x"
    if pixels:
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 8, 8, 7
        ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
        ds.PixelData = bytes(range(64))
    ds.save_as(path, enforce_file_format=True)
    return path


def ask_image(tmp: Path, fx: Fx, name: str, write: Callable[[Path], object]) -> Case:
    img = tmp / name
    write(img)
    return Case(["ask", str(fx.gguf), QUESTION, "--image", str(img)], (name,))


def bomb_png(path: Path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))


def edit_manifest(folder: Path, change: Callable[[dict], object]) -> None:
    p = folder / "manifest.json"
    m = json.loads(p.read_text())
    change(m)
    p.write_text(json.dumps(m))


def cut(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


def run_copy(tmp: Path, fx: Fx, breaks: Callable[[Path], object]) -> Case:
    run = copy(fx.run, tmp)
    breaks(run)
    return Case(["merge", str(run), "--out", str(tmp / "out"), "--no-check"], (), out=tmp / "out")


def with_needles(case: Case, *needles: str, code: int = 2) -> Case:
    case.needles, case.code = needles, code
    return case


def bad_lora_shape(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    p = run / "adapter" / "adapter_model.safetensors"
    state = load_file(p)
    k = next(k for k in state if k.endswith("lora_A.weight"))
    state[k] = state[k].T.contiguous().clone()
    save_file(state, str(p))


def base_cut_in_header(tmp: Path, run: Path, fx: Fx) -> None:
    base = copy(fx.model, tmp, "base")
    cut(base / "model.safetensors", 20)
    edit_manifest(run, lambda m: m["base_model"].update(path=str(base), sha256=None))


def model_copy(tmp: Path, fx: Fx, cmd: list[str], breaks: Callable[[Path], object], *needles: str) -> Case:
    m = copy(fx.merged, tmp)
    breaks(m)
    return Case([*cmd[:2], str(m), *cmd[2:], "--out", str(tmp / "out")], needles, out=tmp / "out")


def gguf_copy(tmp: Path, fx: Fx, breaks: Callable[[Path], object], *needles: str, cmd: str = "ask") -> Case:
    g = copy(fx.gguf, tmp)
    breaks(g)
    if cmd == "serve":
        return Case(["serve", str(g), "--no-verify", "--port", "0"], needles, subprocess=True)
    return Case(["ask", str(g), QUESTION, "--max-tokens", "2"], needles)


def fake_onnx(tmp: Path, fx: Fx, graph: bytes) -> Case:
    from edgemed.artifacts import write_manifest

    folder = tmp / "onnx"
    folder.mkdir()
    (folder / "decoder.onnx").write_bytes(graph)
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(fx.merged / f, folder / f)
    write_manifest(folder, "onnx", arch="llama", quant="fp32", graphs={"decoder": {"file": "decoder.onnx",
                                                                                  "input": "input_ids"}})
    return Case(["ask", str(folder), QUESTION], ("decoder.onnx", "ONNX"))


def bundle_copy(tmp: Path, fx: Fx, breaks: Callable[[Path], object], *needles: str) -> Case:
    g = copy(fx.gguf, tmp)
    breaks(g)
    return Case(["verify", str(g)], needles, code=1, prefix="FAIL ")


def not_a_file_parent(tmp: Path) -> Path:
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "sub" / "out"


LONG_INT = "1" * 5000
DEEP = "[" * 100_000 + "]" * 100_000

# id -> (surface, build(tmp, fx) -> Case)
ROWS: dict[str, tuple[str, Callable[[Path, Fx], Case]]] = {
    # ---- recipe
    "recipe: not UTF-8": ("recipe", lambda t, f: Case(ft(t, recipe_file(t, f, text=b"model:\n  path: \xff\xfe\n")),
                                                      ("recipe.yaml", "not utf-8"), out=t / "out")),
    "recipe: a folder": ("recipe", lambda t, f: Case(ft(t, Path(t)), ("folder",), out=t / "out")),
    "recipe: invalid YAML": ("recipe", lambda t, f: Case(ft(t, recipe_file(t, f, text="model: [unclosed\n")),
                                                         ("recipe.yaml", "not valid yaml"), out=t / "out")),
    "recipe: a YAML list": ("recipe", lambda t, f: Case(ft(t, recipe_file(t, f, text="- a\n- b\n")),
                                                        ("mapping", "list"), out=t / "out")),
    "recipe: empty file": ("recipe", lambda t, f: Case(ft(t, recipe_file(t, f, text="")), ("mapping",),
                                                       out=t / "out")),
    "recipe: YAML nested 5000 deep": ("recipe", lambda t, f: Case(
        ft(t, recipe_file(t, f, text="a: " + "[" * 5000 + "]" * 5000 + "\n")), ("recipe.yaml",), out=t / "out")),
    "recipe: python object tag": ("recipe", lambda t, f: Case(
        ft(t, recipe_file(t, f, text="model: !!python/object/apply:os.system ['true']\n")),
        ("recipe.yaml", "yaml"), out=t / "out")),
    "recipe: unknown key names the allowed keys": ("recipe", lambda t, f: Case(
        ft(t, recipe_file(t, f, {"optim": {"max_steps": 3}})), ("optim.max_steps: unknown key", "allowed here",
                                                                 "batch_size"), out=t / "out")),
    "recipe: no pointer to a missing README": ("recipe", lambda t, f: Case(
        ft(t, recipe_file(t, f, {"lora": {"r": 0}})), ("lora.r", "edgemed/recipes/"), out=t / "out")),
    "recipe: --set without '='": ("recipe", lambda t, f: Case(ft(t, recipe_file(t, f), "--set", "stages"),
                                                              ("key=value", "stages.0.max_steps"), out=t / "out")),
    "recipe: --set index past the list": ("recipe", lambda t, f: Case(
        ft(t, recipe_file(t, f), "--set", "stages.5.max_steps=1"), ("not an index",), out=t / "out")),
    "recipe: --set through a value": ("recipe", lambda t, f: Case(
        ft(t, recipe_file(t, f), "--set", "optim.batch_size.x=1"), ("is a value",), out=t / "out")),
    "recipe: model folder missing": ("recipe", lambda t, f: Case(
        ft(t, recipe_file(t, f, {"model": {"path": str(t / "nope")}})), ("nope", "config.json"), out=t / "out")),
    "recipe: no stages": ("recipe", lambda t, f: Case(ft(t, recipe_file(t, f, {"stages": []})), ("stages",),
                                                      out=t / "out")),
    # ---- data JSONL
    "jsonl: not UTF-8": ("data", lambda t, f: Case(ft(t, recipe_file(t, f, train=jsonl(t, b'{"question": "\xff"}\n'))),
                                                   ("train.jsonl:1", "utf-8"), out=t / "out")),
    "jsonl: a line that is a JSON list": ("data", lambda t, f: Case(
        ft(t, recipe_file(t, f, train=jsonl(t, "[1, 2]\n"))), ("train.jsonl:1", "not an object"), out=t / "out")),
    "jsonl: empty file": ("data", lambda t, f: Case(ft(t, recipe_file(t, f, train=jsonl(t, "\n\n"))),
                                                    ("train.jsonl", "empty"), out=t / "out")),
    "jsonl: missing answer": ("data", lambda t, f: Case(
        ft(t, recipe_file(t, f, train=jsonl(t, [{"question": "q"}]))), ("train.jsonl:1", "'answer'"),
        out=t / "out")),
    "jsonl: question is a number": ("data", lambda t, f: Case(
        ft(t, recipe_file(t, f, train=jsonl(t, [{"question": 3, "answer": "a"}]))), ("'question'", "string"),
        out=t / "out")),
    "jsonl: nested 100000 deep": ("data", lambda t, f: Case(ft(t, recipe_file(t, f, train=jsonl(t, DEEP + "\n"))),
                                                            ("train.jsonl:1", "nested too deeply"), out=t / "out")),
    "jsonl: a 5000-digit integer": ("data", lambda t, f: Case(
        ft(t, recipe_file(t, f, train=jsonl(t, '{"question": "q", "answer": ' + LONG_INT + "}\n"))),
        ("train.jsonl:1", "json"), out=t / "out")),
    "jsonl: unknown answer_type": ("data", lambda t, f: Case(
        ft(t, recipe_file(t, f, train=jsonl(t, [{"question": "q", "answer": "a", "answer_type": "maybe"}]))),
        ("answer_type", "closed"), out=t / "out")),
    "jsonl: image path with ..": ("data", lambda t, f: (png(t / "outside.png"), Case(
        ft(t, recipe_file(t, f, train=jsonl(t, [{"question": "q", "answer": "a", "image": "../outside.png"}]))),
        ("outside the data folder", "allow_outside_images"), out=t / "out"))[1]),
    "jsonl: absolute image path": ("data", lambda t, f: (png(t / "abs.png"), Case(
        ft(t, recipe_file(t, f, train=jsonl(t, [{"question": "q", "answer": "a", "image": str(t / "abs.png")}]))),
        ("outside the data folder",), out=t / "out"))[1]),
    "jsonl: image link pointing out": ("data", lambda t, f: (
        png(t / "real.png"), jsonl(t, [{"question": "q", "answer": "a", "image": "link.png"}]),
        os.symlink(t / "real.png", t / "d" / "link.png"),
        Case(ft(t, recipe_file(t, f, train=t / "d" / "train.jsonl")), ("outside the data folder",),
             out=t / "out"))[-1]),
    "jsonl: missing image": ("data", lambda t, f: Case(
        ft(t, recipe_file(t, f, train=jsonl(t, [{"question": "q", "answer": "a", "image": "nope.png"}]))),
        ("nope.png", "does not exist"), out=t / "out")),
    "jsonl: data path is a folder": ("data", lambda t, f: Case(ft(t, recipe_file(t, f, train=t)),
                                                               ("no such data file",), out=t / "out")),
    "json: VQA-RAD file that is an object": ("data", lambda t, f: Case(
        ft(t, recipe_file(t, f, train=jsonl(t, '{"a": 1}', "set.json"))), ("json list",), out=t / "out")),
    # ---- images and DICOM (ask reads the image before it opens the model)
    "image: PNG cut short": ("image", lambda t, f: ask_image(t, f, "cut.png", lambda p: cut(png(p, 64), 80))),
    "image: text named .png": ("image", lambda t, f: with_needles(ask_image(
        t, f, "text.png", lambda p: p.write_text("hello")), "text.png", "not a png, jpeg or dicom")),
    "image: text named .dcm": ("image", lambda t, f: with_needles(ask_image(
        t, f, "text.dcm", lambda p: p.write_text("hello, not a scan\n")), "text.dcm", "not a dicom file")),
    "image: DICOM without pixel data": ("image", lambda t, f: with_needles(ask_image(
        t, f, "nopix.dcm", lambda p: dicom(p, pixels=False)), "nopix.dcm", "no pixel data")),
    "image: DICOM cut short": ("image", lambda t, f: with_needles(ask_image(
        t, f, "cut.dcm", lambda p: cut(dicom(p), 200)), "cut.dcm", "dicom")),
    "image: PNG header claiming 20000x20000": ("image", lambda t, f: with_needles(ask_image(
        t, f, "bomb.png", bomb_png), "bomb.png", "decompression bomb")),
    "image: GIF": ("image", lambda t, f: with_needles(ask_image(
        t, f, "a.gif", lambda p: Image.new("RGB", (4, 4)).save(p, "GIF")), "a.gif", "not a png")),
    "image: a folder": ("image", lambda t, f: with_needles(ask_image(t, f, "dir.png", lambda p: p.mkdir()),
                                                           "dir.png")),
    # ---- run folders (merge)
    "run: adapter folder gone": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: shutil.rmtree(r / "adapter")), "adapter/adapter_model.safetensors", "missing")),
    "run: adapter weights cut inside the header": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: cut(r / "adapter" / "adapter_model.safetensors", 20)), "adapter_model.safetensors",
        "safetensors")),
    "run: adapter config not JSON": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: (r / "adapter" / "adapter_config.json").write_text("{oops")), "adapter_config.json")),
    "run: adapter config without r": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: (r / "adapter" / "adapter_config.json").write_text('{"lora_alpha": 8}')), "'r'")),
    "run: LoRA tensor of the wrong shape": ("run", lambda t, f: with_needles(run_copy(t, f, bad_lora_shape),
                                                                             "lora pair", "shape")),
    "run: manifest is a JSON list": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: (r / "manifest.json").write_text("[1, 2]")), "manifest.json", "json object")),
    "run: manifest not UTF-8": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: (r / "manifest.json").write_bytes(b'{"kind": "\xff"}')), "manifest.json", "utf-8")),
    "run: manifest empty": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: (r / "manifest.json").write_text("")), "manifest.json")),
    "run: manifest 'files' not a mapping": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: edit_manifest(r, lambda m: m.update(files=["x"]))), "'files'")),
    "run: no manifest": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: (r / "manifest.json").unlink()), "no manifest.json")),
    "run: a model folder given as the run": ("run", lambda t, f: Case(
        ["merge", str(copy(f.merged, t)), "--out", str(t / "out")], ("'model' folder", "run"), out=t / "out")),
    "run: base model gone": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: edit_manifest(r, lambda m: m["base_model"].update(path=str(t / "gone")))), "gone",
        "missing")),
    "run: base checkpoint cut inside its header": ("run", lambda t, f: with_needles(run_copy(
        t, f, lambda r: base_cut_in_header(t, r, f)), "model.safetensors", "safetensors")),
    "run: --out under a file": ("run", lambda t, f: Case(
        ["merge", str(copy(f.run, t)), "--out", str(not_a_file_parent(t)), "--no-check"], ("afile",),
        out=not_a_file_parent(t))),
    # ---- checkpoints (export)
    "model: safetensors cut inside the header (gguf)": ("checkpoint", lambda t, f: model_copy(
        t, f, ["export", "gguf"], lambda m: cut(m / "model.safetensors", 20), "model.safetensors")),
    "model: safetensors cut inside the header (onnx)": ("checkpoint", lambda t, f: model_copy(
        t, f, ["export", "onnx"], lambda m: cut(m / "model.safetensors", 20), "merged")),
    "model: a listed file missing (gguf)": ("checkpoint", lambda t, f: model_copy(
        t, f, ["export", "gguf"], lambda m: (m / "tokenizer.json").unlink(), "tokenizer.json", "missing")),
    "model: a listed file missing (onnx)": ("checkpoint", lambda t, f: model_copy(
        t, f, ["export", "onnx"], lambda m: (m / "tokenizer.json").unlink(), "tokenizer.json", "missing")),
    "model: config.json not JSON": ("checkpoint", lambda t, f: model_copy(
        t, f, ["export", "gguf"], lambda m: (m / "config.json").write_text("{"), "config.json")),
    "model: config.json a list": ("checkpoint", lambda t, f: model_copy(
        t, f, ["export", "gguf"], lambda m: (m / "config.json").write_text("[]"), "config.json", "json object")),
    "model: config.json without model_type": ("checkpoint", lambda t, f: model_copy(
        t, f, ["export", "onnx"], lambda m: (m / "config.json").write_text("{}"), "model_type")),
    # (export gguf takes a run folder: base + LoRA adapter files, tests/test_export_gguf_adapter.py)
    "model: a run given to export onnx": ("checkpoint", lambda t, f: Case(
        ["export", "onnx", str(copy(f.run, t)), "--out", str(t / "out")], ("training run",), out=t / "out")),
    "model: unknown quant": ("checkpoint", lambda t, f: Case(
        ["export", "gguf", str(f.merged), "--quant", "q3_x", "--out", str(t / "out")], ("q3_x", "q4_k_m"),
        out=t / "out")),
    "model: --out under a file": ("checkpoint", lambda t, f: Case(
        ["export", "gguf", str(f.merged), "--out", str(not_a_file_parent(t))], ("afile",),
        out=not_a_file_parent(t))),
    # ---- GGUF / ONNX bundles
    "gguf: cut short (ask)": ("bundle", lambda t, f: gguf_copy(
        t, f, lambda g: cut(g / "model-f16.gguf", (g / "model-f16.gguf").stat().st_size // 2), "model-f16.gguf",
        "cut short")),
    "gguf: cut inside the header (ask)": ("bundle", lambda t, f: gguf_copy(
        t, f, lambda g: cut(g / "model-f16.gguf", 40), "model-f16.gguf", "gguf")),
    "gguf: text instead of GGUF (ask)": ("bundle", lambda t, f: gguf_copy(
        t, f, lambda g: (g / "model-f16.gguf").write_text("not a model"), "model-f16.gguf", "not a gguf")),
    "gguf: cut short (serve --no-verify)": ("bundle", lambda t, f: gguf_copy(
        t, f, lambda g: cut(g / "model-f16.gguf", (g / "model-f16.gguf").stat().st_size // 2), "model-f16.gguf",
        "cut short", cmd="serve")),
    "gguf: a listed file missing (ask)": ("bundle", lambda t, f: gguf_copy(
        t, f, lambda g: (g / "tokenizer.json").unlink(), "tokenizer.json", "missing")),
    "gguf: manifest a JSON list (ask)": ("bundle", lambda t, f: gguf_copy(
        t, f, lambda g: (g / "manifest.json").write_text("[]"), "manifest.json", "json object")),
    "onnx: decoder graph is garbage (ask)": ("bundle", lambda t, f: fake_onnx(t, f, b"\x08\x07garbage" * 10)),
    "onnx: decoder graph empty (ask)": ("bundle", lambda t, f: fake_onnx(t, f, b"")),
    "bundle: verify, manifest a JSON list": ("manifest", lambda t, f: bundle_copy(
        t, f, lambda g: (g / "manifest.json").write_text("[]"), "json object")),
    "bundle: verify, manifest not UTF-8": ("manifest", lambda t, f: bundle_copy(
        t, f, lambda g: (g / "manifest.json").write_bytes(b"\xff\xfe"), "utf-8")),
    "bundle: verify, a file missing": ("manifest", lambda t, f: bundle_copy(
        t, f, lambda g: (g / "tokenizer.json").unlink(), "tokenizer.json", "missing")),
    "bundle: verify, a file changed": ("manifest", lambda t, f: bundle_copy(
        t, f, lambda g: (g / "tokenizer_config.json").write_text("{}"), "tokenizer_config.json", "sha256")),
    # ---- parity
    "parity: reference is not the export's parent": ("parity", lambda t, f: Case(
        ["parity", str(f.gguf), "--reference", str(f.other), "--max-probes", "2", "--threads", "1"],
        ("not the model this export came from",), code=1, prefix="verdict: ")),
    "parity: parent gone, no reference": ("parity", lambda t, f: (
        g := copy(f.gguf, t), edit_manifest(g, lambda m: m["parent"].update(path=str(t / "gone"))),
        Case(["parity", str(g)], ("gone", "--reference")))[-1]),
    "parity: probe file not UTF-8": ("parity", lambda t, f: Case(
        ["parity", str(f.gguf), "--probes", str(jsonl(t, b'{"question": "\xff"}\n'))], ("train.jsonl:1",))),
    "parity: --max-probes 0": ("parity", lambda t, f: Case(["parity", str(f.gguf), "--max-probes", "0"],
                                                          ("max-probes",))),
    # ---- one validation for every front end: ask as the server
    "ask: --max-tokens -1": ("cli", lambda t, f: Case(["ask", str(f.gguf), QUESTION, "--max-tokens", "-1"],
                                                      ("max_tokens",))),
    "ask: --max-tokens 0": ("cli", lambda t, f: Case(["ask", str(f.gguf), QUESTION, "--max-tokens", "0"],
                                                     ("max_tokens",))),
    "ask: --max-tokens over the cap": ("cli", lambda t, f: Case(
        ["ask", str(f.gguf), QUESTION, "--max-tokens", "100000"], ("exceeds the cap",))),
    "ask: --temperature -3": ("cli", lambda t, f: Case(["ask", str(f.gguf), QUESTION, "--temperature", "-3"],
                                                       ("temperature",))),
    "ask: --temperature 2.5": ("cli", lambda t, f: Case(["ask", str(f.gguf), QUESTION, "--temperature", "2.5"],
                                                        ("temperature",))),
    "ask: --seed -1": ("cli", lambda t, f: Case(["ask", str(f.gguf), QUESTION, "--seed", "-1"], ("seed",))),
    "ask: a folder that is no model": ("cli", lambda t, f: Case(["ask", str(t), QUESTION],
                                                                ("neither an edgemed folder",))),
}


def _run_cli(case: Case):
    if case.subprocess:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        p = subprocess.run([sys.executable, "-m", "edgemed.cli", *case.argv], capture_output=True, text=True,
                           timeout=120, env=env)
        return p.returncode, p.stdout + p.stderr
    r = CliRunner().invoke(main, case.argv)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


@pytest.mark.parametrize("row", list(ROWS))
def test_cli_row(row, fx, tmp_path):
    surface, build = ROWS[row]
    case = build(tmp_path, fx)
    before = snapshot(tmp_path, skip=case.out)
    shared = {p: snapshot(p) for p in (fx.run, fx.merged, fx.gguf)}
    code, output = _run_cli(case)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert "Traceback" not in output and "internal error" not in output, output
    assert code == case.code, output
    hits = [ln for ln in lines if ln.startswith(case.prefix)]
    assert hits, output
    text = " ".join(hits).lower()
    for needle in case.needles:
        assert needle.lower() in text, (needle, output)
    if case.prefix == "error: ":
        assert len(hits) == 1 and lines[-1] == hits[0], output  # one error line, and it is the last thing said
    if case.out is not None:
        assert not case.out.exists(), "an output was left behind"
        if case.out.parent.is_dir():
            assert not [p for p in case.out.parent.iterdir() if p.name.startswith(f".{case.out.name}.")]
    assert snapshot(tmp_path, skip=case.out) == before, "an input was changed"
    assert {p: snapshot(p) for p in shared} == shared, "a shared fixture was changed"


def test_the_battery_covers_every_surface():
    surfaces = {s for s, _ in ROWS.values()}
    assert {"recipe", "data", "image", "run", "checkpoint", "bundle", "manifest", "cli", "parity"} <= surfaces
    assert len(ROWS) + len(HTTP) >= 60


# ---------------------------------------------------------------------------------------------- HTTP rows
ALLOWED_ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def http(tiny_model):
    """The API over a tiny image model (so that image URLs reach their checks), on a loopback base URL."""
    from fastapi.testclient import TestClient

    from edgemed.backends.pytorch import TorchBackend
    from edgemed.serve import ServeConfig, create_app

    folder = tiny_model("llava")
    backend = TorchBackend(folder)
    config = ServeConfig(export_dir=folder, max_tokens_cap=4, max_body_bytes=1 << 20, allow_origins=[ALLOWED_ORIGIN])
    with TestClient(create_app(config, backend), base_url="http://127.0.0.1:8080") as client:
        yield client
    backend.close()


def chat(**kw) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}).encode()


JSON = {"content-type": "application/json"}
# id -> (method, path, headers, body, status, error code or None for success)
HTTP: dict[str, tuple[str, str, dict, bytes | None, int, str | None]] = {
    "text/plain body (CORS simple request)": ("POST", "/v1/chat/completions", {"content-type": "text/plain"},
                                              chat(), 415, "unsupported_media_type"),
    "form body": ("POST", "/v1/chat/completions", {"content-type": "application/x-www-form-urlencoded"}, chat(),
                  415, "unsupported_media_type"),
    "multipart body": ("POST", "/v1/chat/completions", {"content-type": "multipart/form-data; boundary=x"}, chat(),
                       415, "unsupported_media_type"),
    "no content type": ("POST", "/v1/chat/completions", {}, chat(), 415, "unsupported_media_type"),
    "foreign Origin": ("POST", "/v1/chat/completions", {**JSON, "origin": "http://evil.example"}, chat(), 403,
                       "origin_refused"),
    "Origin null (file:// page)": ("POST", "/v1/chat/completions", {**JSON, "origin": "null"}, chat(), 403,
                                   "origin_refused"),
    "text/plain from a foreign Origin": ("POST", "/v1/chat/completions",
                                         {"content-type": "text/plain", "origin": "http://evil.example"}, chat(),
                                         403, "origin_refused"),
    "cross-site fetch without Origin": ("GET", "/v1/models", {"sec-fetch-site": "cross-site"}, None, 403,
                                        "origin_refused"),
    "foreign Origin reading models": ("GET", "/v1/models", {"origin": "http://evil.example"}, None, 403,
                                      "origin_refused"),
    "preflight from a foreign Origin": ("OPTIONS", "/v1/chat/completions",
                                        {"origin": "http://evil.example", "access-control-request-method": "POST"},
                                        None, 403, "origin_refused"),
    "DNS rebinding Host": ("POST", "/v1/chat/completions", {**JSON, "host": "evil.example"}, chat(), 403,
                           "host_refused"),
    "rebinding Host with a loopback prefix": ("GET", "/health", {"host": "127.0.0.1.evil.example:8080"}, None, 403,
                                              "host_refused"),
    "JSON nested 100000 deep": ("POST", "/v1/chat/completions", JSON, DEEP.encode(), 400, "invalid_json"),
    "body not UTF-8": ("POST", "/v1/chat/completions", JSON, b'{"messages": "\xff"}', 400, "invalid_json"),
    "a 5000-digit integer": ("POST", "/v1/chat/completions", JSON,
                             b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + LONG_INT.encode() + b"}",
                             400, "invalid_json"),
    "max_tokens -1": ("POST", "/v1/chat/completions", JSON, chat(max_tokens=-1), 400, "invalid_request"),
    "temperature -3": ("POST", "/v1/chat/completions", JSON, chat(temperature=-3), 400, "invalid_request"),
    "seed -1": ("POST", "/v1/chat/completions", JSON, chat(seed=-1), 400, "invalid_request"),
    "max_tokens over the cap": ("POST", "/v1/chat/completions", JSON, chat(max_tokens=5), 400,
                                "max_tokens_exceeded"),
    "five stop strings": ("POST", "/v1/chat/completions", JSON, chat(stop=["a", "b", "c", "d", "e"]), 400,
                          "invalid_request"),
    "body over the size limit": ("POST", "/v1/chat/completions", JSON, chat(pad="x" * (2 << 20)), 413,
                                 "body_too_large"),
    "remote image URL": ("POST", "/v1/chat/completions", JSON, json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]}).encode(), 400,
        "remote_url_refused"),
    "file image without --allow-dir": ("POST", "/v1/chat/completions", JSON, json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).encode(),
        403, "path_not_allowed"),
    # what must still work
    "localhost Host": ("POST", "/v1/chat/completions", {**JSON, "host": "localhost:8080"}, chat(), 200, None),
    "[::1] Host": ("GET", "/health", {"host": "[::1]:8080"}, None, 200, None),
    "listed Origin": ("POST", "/v1/chat/completions", {**JSON, "origin": ALLOWED_ORIGIN}, chat(), 200, None),
    "preflight from a listed Origin": ("OPTIONS", "/v1/chat/completions",
                                       {"origin": ALLOWED_ORIGIN, "access-control-request-method": "POST"}, None,
                                       204, None),
    "json with charset": ("POST", "/v1/chat/completions", {"content-type": "application/json; charset=utf-8"},
                          chat(), 200, None),
}


@pytest.mark.parametrize("row", list(HTTP))
def test_http_row(row, http):
    method, path, headers, body, status, code = HTTP[row]
    r = http.request(method, path, headers=headers, content=body)
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    if code is not None:
        err = r.json()["error"]
        assert err["code"] == code and err["message"], err
        assert "access-control-allow-origin" not in r.headers
    elif "origin" in headers:
        assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert http.get("/health").json()["status"] == "ok"


def test_check_config_refuses_a_malformed_origin(fx):
    from edgemed.errors import ServeError
    from edgemed.serve import ServeConfig, check_config

    with pytest.raises(ServeError, match="--allow-origin 'localhost:3000' is not an origin"):
        check_config(ServeConfig(export_dir=fx.merged, allow_origins=["localhost:3000"]))


def test_allow_host_adds_a_name(fx):
    from edgemed.serve import ServeConfig, host_allowed

    config = ServeConfig(export_dir=fx.merged, allow_hosts=["ward-pc.local"])
    assert host_allowed("ward-pc.local:8080", config) and not host_allowed("evil.example", config)
    assert host_allowed("10.0.0.5:8080", ServeConfig(export_dir=fx.merged, host="10.0.0.5", api_key="k"))
    assert not host_allowed("10.0.0.5", ServeConfig(export_dir=fx.merged, host="0.0.0.0", api_key="k"))


# ---------------------------------------------------------------------------------------------- leftovers
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_debris_of_a_killed_writer_is_removed_and_a_live_writers_kept(tmp_path):
    out = tmp_path / "demo"
    dead = tmp_path / f".demo.partial-{_dead_pid()}"
    dead.mkdir()
    (dead / "model-f16.gguf").write_bytes(b"GGUF" + b"\0" * 1000)  # looks like a full export
    old = tmp_path / f".demo.old-{_dead_pid()}"
    old.mkdir()
    live = tmp_path / f".demo.partial-{os.getppid()}"  # the process that started this one is alive
    live.mkdir()
    r = CliRunner().invoke(main, ["data", "demo", "--out", str(out), "--n-train", "2", "--n-val", "2",
                                  "--n-test", "2"])
    assert r.exit_code == 0, r.output
    assert not dead.exists() and not old.exists() and live.is_dir()
    assert (out / "train.jsonl").is_file()


def test_finetune_help_example_is_a_valid_override(fx, tmp_path):
    from edgemed.recipe import load_recipe

    help_text = CliRunner().invoke(main, ["finetune", "--help"]).output
    example = help_text.split("e.g. --set ")[1].split()[0]
    assert example == "stages.0.max_steps=20"
    assert load_recipe(recipe_file(tmp_path, fx), [example]).stages[0].max_steps == 20


def test_a_bug_prints_one_line_and_logs_the_traceback(tmp_path, monkeypatch):
    """The last resort: an unexpected exception is one line naming a log file that holds the traceback."""
    import edgemed.data

    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))

    def boom(*a, **k):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(edgemed.data, "generate_demo_set", boom)
    r = CliRunner().invoke(main, ["data", "demo", "--out", str(tmp_path / "x")])
    assert r.exit_code == 3 and "Traceback" not in r.output
    line = r.output.strip()
    assert line.startswith("error: internal error") and "\n" not in line and "ZeroDivisionError" in line
    logs = list((tmp_path / "home" / "logs").glob("edgemed-crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in line and "Traceback" in logs[0].read_text()


def test_a_refused_file_operation_names_the_file(tmp_path, monkeypatch):
    """Disk full or permission denied deep inside a stage: one line naming the file, exit 2, no crash log."""
    import errno

    import edgemed.data

    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "train.jsonl"))

    monkeypatch.setattr(edgemed.data, "generate_demo_set", full)
    r = CliRunner().invoke(main, ["data", "demo", "--out", str(tmp_path / "x")])
    line = r.output.strip()
    assert r.exit_code == 2 and line.startswith("error: ") and "\n" not in line, r.output
    assert "train.jsonl: No space left on device" in line and not (tmp_path / "home" / "logs").exists()


# ---------------------------------------------------------------------------------------------- properties
_WORK = Path(tempfile.mkdtemp(prefix="edgemed-hostile-"))
_KEYS = ["question", "answer", "image", "answer_type", "system", "role", "task", "text", "title"]
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=8)
_record = st.dictionaries(st.sampled_from(_KEYS), _json | st.sampled_from(["yes", "open", "closed", "a.png", ""]),
                          max_size=6)
_line = st.one_of(st.binary(max_size=60), _record.map(lambda d: json.dumps(d).encode()))
_file = st.lists(_line, max_size=6).map(lambda lines: b"\n".join(lines))
PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write(data: bytes, name: str) -> Path:
    p = _WORK / name
    p.write_bytes(data)
    return p


@PROPS
@given(_file, st.sampled_from(["vqa", "text", "auto"]))
def test_any_bytes_give_records_or_a_data_error(data, fmt):
    from edgemed.data import TextRecord, VQARecord, read_dataset

    (_WORK / "a.png").write_bytes(b"")
    try:
        records = read_dataset(_write(data, "p.jsonl"), fmt=fmt)
    except DataError as e:
        assert str(e)
        return
    for r in records:
        assert isinstance(r, VQARecord | TextRecord)
        if isinstance(r, VQARecord):
            assert r.question.strip() and r.answer.strip() and r.answer_type in ("closed", "open")
            assert r.image is None or r.image.resolve().is_relative_to(_WORK.resolve())


@PROPS
@given(st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode())))
def test_any_bytes_as_a_public_set_give_records_or_a_data_error(data):
    from edgemed.data import read_dataset

    (_WORK / "imgs").mkdir(exist_ok=True)
    try:
        read_dataset(_write(data, "set.json"))
    except DataError as e:
        assert str(e)


@PROPS
@given(_file)
def test_any_bytes_as_probes_give_probes_or_a_data_error(data):
    from edgemed.parity import read_probes

    try:
        probes = read_probes(_write(data, "probes.jsonl"))
    except DataError:
        return
    assert all(p.question.strip() for p in probes)


@PROPS
@given(st.binary(max_size=300))
def test_any_bytes_as_an_image_give_an_image_or_a_data_error(data):
    from edgemed.data import load_image_bytes

    for mime in ("image/png", "application/dicom"):
        try:
            im = load_image_bytes(data, mime, max_pixels=10_000)
        except DataError:
            continue
        assert im.mode == "RGB"


@PROPS
@given(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.floats(allow_nan=True),
       st.one_of(st.none(), st.integers(-2**70, 2**70)), st.lists(st.text(max_size=3), max_size=6))
def test_request_limits_give_params_or_a_limit_error(max_tokens, temperature, top_p, seed, stop):
    from edgemed.limits import LimitError, gen_params

    try:
        p = gen_params(max_tokens, temperature, top_p, seed, stop, cap=512)
    except LimitError as e:
        assert "max_tokens" in str(e) or "temperature" in str(e) or "top_p" in str(e) or "seed" in str(e) \
            or "stop" in str(e)
        return
    assert 1 <= p.max_tokens <= 512 and 0 <= p.temperature <= 2 and 0 < p.top_p <= 1 and len(p.stop) <= 4


_body = st.dictionaries(
    st.sampled_from(["messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n", "model"]),
    _json | st.just([{"role": "user", "content": "hi"}]), max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), _body.map(lambda d: json.dumps(d).encode()),
                 _json.map(lambda v: json.dumps(v).encode())))
def test_any_request_body_gets_an_answer_or_a_4xx(http, body):
    r = http.post("/v1/chat/completions", content=body, headers=JSON)
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text
    if r.status_code != 200:
        assert r.json()["error"]["message"]


def test_edgemed_errors_are_the_only_escape(tmp_path):
    """The readers raise EdgemedError subclasses and nothing else on a sample of broken files."""
    from edgemed.files import check_gguf, read_json, safetensors_keys

    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\xff" * 10)
    for fn in (check_gguf, safetensors_keys, lambda p: read_json(p, "a manifest")):
        with pytest.raises(EdgemedError, match="bad"):
            fn(bad)
        with pytest.raises(EdgemedError, match="folder"):
            fn(tmp_path)

"""Manifests: every writer's folder validates as its kind with base_model in the one shape, old shapes read through
the upgrade, and the one walk (parent, lineage, run_of, base_of) gets from an export back to its base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_vqa

from edgemed import manifest as mf
from edgemed.artifacts import read_manifest, tree_sha256, write_manifest
from edgemed.bundle import finalize, lineage, verify
from edgemed.errors import ArtifactError

BASE_KEYS = set(mf.BaseRef.model_fields)


@pytest.fixture(scope="module")
def chain(tiny_model, tmp_path_factory):
    """run -> merged model -> GGUF and ONNX exports, and the run's own adapter export, written by the current code."""
    from edgemed.export.gguf import export_gguf
    from edgemed.export.onnx import export_onnx
    from edgemed.merge import merge
    from edgemed.recipe import Recipe
    from edgemed.train import finetune

    root = tmp_path_factory.mktemp("chain")
    base = tiny_model("llama")
    data = write_vqa(root / "data", n=4, image=False)
    recipe = Recipe.model_validate({
        "model": {"path": str(base), "id": "tiny/llama"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                                    "init": "nonzero"},
        "optim": {"lr": 1e-2, "batch_size": 2},
        "stages": [{"name": "s", "data": {"train": str(data)}, "max_steps": 1}]})
    run = finetune(recipe, root / "run")
    model = merge(run, root / "model", check=False)
    return {"base": base, "run": run, "model": model,
            "gguf": export_gguf(model, ["f16"], root / "gguf"),
            "adapter": export_gguf(run, ["f16"], root / "adapter"),
            "onnx": export_onnx(model, "fp32", root / "onnx")}


# ---------------------------------------------------------------------------------------------- current writers
def test_every_writer_validates_as_its_kind_with_one_base_shape(chain):
    kinds = {"run": mf.RunManifest, "model": mf.ModelManifest, "gguf": mf.GGUFManifest,
             "adapter": mf.GGUFManifest, "onnx": mf.OnnxManifest}
    for name, cls in kinds.items():
        m = mf.load(chain[name])
        assert type(m) is cls and m.folder == chain[name] and m.edgemed_manifest == mf.SCHEMA, name
        raw = json.loads((chain[name] / mf.MANIFEST).read_text())
        assert "base_model_sha256" not in raw, name  # the GGUF writers' name + sha pair, folded by write_manifest
        if "base_model" in raw:
            assert set(raw["base_model"]) == BASE_KEYS, name
    want = tree_sha256(chain["base"])
    run, model = mf.load(chain["run"]), mf.load(chain["model"])
    assert run.base_model.path == str(chain["base"]) and run.base_model.sha256 == want
    assert run.base_model.id == "tiny/llama" and run.base_model.name == chain["base"].name
    assert model.base_model == run.base_model
    assert model.parent.kind == "run" and model.parent.tree_sha256 == tree_sha256(chain["run"])
    for name in ("gguf", "adapter"):
        ref = mf.load(chain[name]).base_model
        assert ref.name == chain["base"].name and ref.sha256 is not None and ref.path is None, name
    assert mf.load(chain["gguf"]).base_model.sha256 == want  # the merged model's base, passed on


def test_read_manifest_is_the_typed_manifest_as_a_dict(chain):
    m = read_manifest(chain["gguf"], ("gguf",))
    assert m == mf.load(chain["gguf"]).to_dict()
    assert m["base_model"]["name"] == chain["base"].name and "base_model_sha256" not in m
    assert m["models"] == {"f16": "model-f16.gguf"}
    assert "binding" not in m  # fields the file does not hold stay absent, so .get(key, default) still works
    assert read_manifest(chain["adapter"])["binding"]["base_tree_sha256"] == tree_sha256(chain["base"])


def test_lineage_walks_from_each_export_back_to_the_run(chain):
    for name, first in (("gguf", "gguf"), ("onnx", "onnx"), ("adapter", "gguf")):
        walk = mf.lineage(chain[name])
        want = [first, "model", "run"] if name != "adapter" else ["gguf", "run"]
        assert [m.kind for m in walk] == want, name  # the tiny base has no manifest: the walk ends there
        assert mf.run_of(chain[name]).folder == chain["run"]
    base = mf.base_of(mf.lineage(chain["gguf"]))
    assert base.sha256 == tree_sha256(chain["base"])
    assert base.path == str(chain["base"]) and base.id == "tiny/llama"  # filled from the run's reference
    assert mf.parent(mf.load(chain["model"])).folder == chain["run"]
    assert mf.parent(mf.load(chain["run"])) is None
    assert mf.run_behind(None, chain["base"], chain["onnx"]).folder == chain["run"]
    assert mf.run_of(chain["base"]) is None and mf.kind_of(chain["base"]) is None
    assert mf.kind_of(chain["onnx"]) == "onnx"


def test_bundle_lineage_names_run_merge_and_base(chain, tmp_path):
    import shutil

    folder = tmp_path / "gguf"
    shutil.copytree(chain["gguf"], folder)
    lin = lineage(folder)
    assert lin["adapter"]["path"] == str(chain["run"]) and lin["merged_model"]["path"] == str(chain["model"])
    assert lin["base_model"]["sha256"] == tree_sha256(chain["base"]) and set(lin["base_model"]) == BASE_KEYS
    assert lin["recipe_sha256"] and lin["data"]["s"]["train_sha256"]
    finalize(folder)
    assert verify(folder) == []
    assert "tiny/llama" in (folder / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- old shapes
def _old(folder: Path, body: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / mf.MANIFEST).write_text(json.dumps(body))
    return folder


def old_chain(tmp_path: Path) -> dict[str, Path]:
    """A schema-1 GGUF export (base model as a name, its sha beside it) of a schema-1 merge (parent.sha256)."""
    run = _old(tmp_path / "run", {"edgemed_manifest": 1, "kind": "run", "recipe": {"model": {"path": "/m"}},
                                  "base_model": {"path": "/models/SmolLM2-135M-Instruct", "sha256": "ab" * 32,
                                                 "model_type": "llama", "id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                  "parent": {"kind": "model", "path": "/models/SmolLM2-135M-Instruct"}})
    model = _old(tmp_path / "model", {"edgemed_manifest": 1, "kind": "model", "name": "merged",
                                      "base_model": {"path": "/models/SmolLM2-135M-Instruct", "sha256": "ab" * 32,
                                                     "model_type": "llama"},
                                      "parent": {"kind": "run", "path": str(run), "sha256": "cd" * 32}})
    gguf = _old(tmp_path / "gguf", {"edgemed_manifest": 1, "kind": "gguf", "name": "merged", "arch": "llama",
                                    "quants": ["q8_0"], "models": {"q8_0": "model-q8_0.gguf"},
                                    "base_model": "SmolLM2-135M-Instruct", "base_model_sha256": "ab" * 32,
                                    "parent": {"path": str(model), "tree_sha256": "ef" * 32,
                                               "manifest": "no manifest"}})
    return {"run": run, "model": model, "gguf": gguf}


def test_old_gguf_manifest_reads_in_the_current_shape(tmp_path):
    old = old_chain(tmp_path)
    m = read_manifest(old["gguf"], ("gguf",))
    assert m["base_model"] == {"path": None, "sha256": "ab" * 32, "id": None, "name": "SmolLM2-135M-Instruct",
                               "model_type": None}
    assert "base_model_sha256" not in m and m["edgemed_manifest"] == mf.SCHEMA
    assert m["parent"]["manifest"] == "no manifest" and m["quants"] == ["q8_0"]
    merged = mf.load(old["model"])
    assert merged.parent.tree_sha256 == "cd" * 32 and "sha256" not in merged.to_dict()["parent"]
    assert mf.load(old["run"]).base_model.name == "SmolLM2-135M-Instruct"  # named after its path
    # the file itself is not rewritten by reading it
    assert json.loads((old["gguf"] / mf.MANIFEST).read_text())["base_model"] == "SmolLM2-135M-Instruct"


def test_old_chain_walks_and_bundles(tmp_path):
    old = old_chain(tmp_path)
    assert [m.kind for m in mf.lineage(old["gguf"])] == ["gguf", "model", "run"]
    base = mf.base_of(mf.lineage(old["gguf"]))
    assert base.name == "SmolLM2-135M-Instruct" and base.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base.path == "/models/SmolLM2-135M-Instruct" and base.model_type == "llama"
    (old["gguf"] / "model-q8_0.gguf").write_bytes(b"GGUF")
    written = finalize(old["gguf"])
    assert written["edgemed_manifest"] == mf.SCHEMA and "base_model_sha256" not in written
    assert written["lineage"]["adapter"]["path"] == str(old["run"])
    assert verify(old["gguf"]) == []


def test_upgrade_is_pure_and_idempotent():
    raw = {"kind": "gguf", "base_model": "x", "base_model_sha256": "s"}
    once = mf.upgrade(raw)
    assert raw == {"kind": "gguf", "base_model": "x", "base_model_sha256": "s"}
    assert mf.upgrade(once) == once
    assert "base_model" not in mf.upgrade({"kind": "onnx"})  # no base named: none invented


def test_write_manifest_folds_a_name_and_sha_into_one_base(tmp_path):
    written = write_manifest(tmp_path, "gguf", base_model="SmolLM2", base_model_sha256="ab" * 32)
    assert written["base_model"]["name"] == "SmolLM2" and written["base_model"]["sha256"] == "ab" * 32
    assert "base_model_sha256" not in json.loads((tmp_path / mf.MANIFEST).read_text())
    ref = mf.BaseRef(path="/m/base", sha256="cd" * 32)
    assert write_manifest(tmp_path, "model", base_model=ref)["base_model"]["name"] == "base"


# ---------------------------------------------------------------------------------------------- refusals
def test_bad_fields_are_all_named_at_once(tmp_path):
    folder = _old(tmp_path / "g", {"kind": "gguf", "files": ["x"], "quants": "q8_0", "image_token_id": "seven"})
    with pytest.raises(ArtifactError) as e:
        read_manifest(folder)
    msg = str(e.value)
    assert "'files'" in msg and "'quants'" in msg and "'image_token_id'" in msg and "damaged" in msg
    assert "\n" not in msg


def test_unknown_kind_and_newer_schema_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match="kind 'banana' is not one edgemed writes"):
        read_manifest(_old(tmp_path / "a", {"kind": "banana"}))
    with pytest.raises(ArtifactError, match="schema 9 is newer.*upgrade edgemed"):
        read_manifest(_old(tmp_path / "b", {"kind": "model", "edgemed_manifest": 9}))
    with pytest.raises(ArtifactError, match="is a 'run' folder, expected gguf"):
        read_manifest(_old(tmp_path / "c", {"kind": "run"}), ("gguf",))
    with pytest.raises(ArtifactError, match="'base_model.colour'"):
        read_manifest(_old(tmp_path / "d", {"kind": "model", "base_model": {"path": "/x", "colour": 1}}))


def test_a_writer_mistake_fails_at_write_time(tmp_path):
    with pytest.raises(ValueError, match="'quants'"):
        write_manifest(tmp_path, "gguf", quants=3)
    with pytest.raises(ValueError, match="unknown artifact kind"):
        write_manifest(tmp_path, "tarball")
    assert not (tmp_path / mf.MANIFEST).exists()


def test_the_walk_ends_at_loops_and_damaged_ancestors(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _old(a, {"kind": "model", "parent": {"path": str(b)}})
    _old(b, {"kind": "model", "parent": {"path": str(a)}})
    assert [m.folder for m in mf.lineage(a)] == [a, b]
    (b / mf.MANIFEST).write_text("{not json")
    assert [m.folder for m in mf.lineage(a)] == [a]
    with pytest.raises(ArtifactError, match="manifest"):
        mf.parent(mf.load(a))  # asked for directly, the damage is named
    _old(b, {"kind": "model", "parent": {"path": str(tmp_path / "gone")}})
    assert [m.folder for m in mf.lineage(a)] == [a, b] and mf.run_of(a) is None and mf.base_of(mf.load(a)) is None

"""Every recipe file validates; bad keys and values fail with their names, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemed.errors import RecipeError
from edgemed.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes_for_each_paper():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_names_its_command(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# edgemed finetune recipes/" + path.name), first
    assert recipe.stages, path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_model_id_names_a_registered_architecture(path):
    from edgemed.archs import REGISTRY

    recipe = load_recipe(path)
    if recipe.model.id is None:
        assert recipe.model.path.startswith("embedded:")
        return
    assert any(recipe.model.id in spec.real_model_ids for spec in REGISTRY.values()), recipe.model.id


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {path: x}\nstages: [{name: a, data: {train: t.jsonl}}]\noptim: {lrr: 1}\n")
    with pytest.raises(RecipeError, match=r"optim\.lrr: unknown key"):
        load_recipe(p)


def test_all_problems_reported_at_once(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {path: x}\nstages: [{name: a, data: {train: t.jsonl}, train: {decoder: full}}]\n"
                 "method: qlora4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "2 problems" in msg and "method" in msg and "stages.0.train.decoder" in msg
    assert "\n" not in msg


def test_overrides_beat_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {path: x}\nstages: [{name: a, data: {train: t.jsonl}, max_steps: 5}]\n")
    r = load_recipe(p, ["stages.0.max_steps=7", "optim.lr=0.5", "prompt.system=Be brief."])
    assert r.stages[0].max_steps == 7 and r.optim.lr == 0.5 and r.prompt.system == "Be brief."
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(p, ["stages.3.max_steps=1"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(p, ["optim.lr"])


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {path: x}\nstages: [\n  - name: a\n   bad\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: not valid YAML"):
        load_recipe(p)

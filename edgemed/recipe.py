"""Fine-tuning recipes: YAML validated into typed models.

Unknown keys fail with their name (``extra="forbid"``), every problem is reported at once, and the command
line (``--set a.b=value``) overrides the recipe, which overrides the defaults below. What trains is said per
part: ``vision: frozen|lora``, ``projector: frozen|train``, ``decoder: lora|layernorm|frozen``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgemed.errors import RecipeError
from edgemed.files import read_text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    path: str = Field(description="Local model folder, or embedded:smollm2-135m / embedded:smollm2-135m-llava")
    id: str | None = Field(None, description="The public checkpoint the recipe was written for (documentation)")


class Parts(_Strict):
    vision: Literal["frozen", "lora"] = "frozen"
    projector: Literal["frozen", "train"] = "frozen"
    decoder: Literal["lora", "layernorm", "frozen"] = "lora"


class LoraSpec(_Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    decoder_targets: list[str] | None = Field(None, description="Leaf module names; default: the arch's table")
    vision_targets: list[str] | None = None
    init: Literal["default", "nonzero"] = Field("default", description="nonzero: B starts random (tests)")


class QuantSpec(_Strict):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    allow_cpu: bool = Field(False, description="Run 4-bit on CPU instead of falling back (slow; for tests)")


class DataSpec(_Strict):
    train: str
    validation: str | None = None
    format: Literal["auto", "vqa", "text", "vqa-rad", "slake", "pathvqa", "r2gen"] = "auto"
    image_root: str | None = None
    allow_outside_images: bool = Field(False, description="Let image paths lead out of the image folder "
                                       "(image_root, or the data file's folder); refused by default")
    split: str | None = Field(None, description="Split inside the train file: VQA-RAD train/test, R2Gen train "
                                                "(the default for r2gen)")
    validation_split: str | None = Field(None, description="Split inside the validation file (R2Gen default: val)")
    trust_pickle: bool = Field(False, description="Read PathVQA's release .pkl files (a pickle can run code)")
    limit: int | None = Field(None, ge=1, description="Use only the first N training records")


class PromptSpec(_Strict):
    system: str | None = Field(None, description="System prompt when a record has none")
    role: str | None = Field(None, description="Role-based prompt, e.g. 'an experienced radiologist'")
    tasks: dict[str, str] = Field(default_factory=dict,
                                  description="Task-specific instruction by record 'task', put before the question")


class Stage(_Strict):
    name: str
    data: DataSpec
    train: Parts = Parts()
    max_steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    lr: float | None = Field(None, gt=0)


class Optim(_Strict):
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class Recipe(_Strict):
    paper: str | None = Field(None, description="The study this recipe follows")
    model: ModelSpec
    method: Literal["lora", "qlora"] = "lora"
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype for method lora")
    lora: LoraSpec = LoraSpec()
    quant: QuantSpec = QuantSpec()
    prompt: PromptSpec = PromptSpec()
    optim: Optim = Optim()
    stages: list[Stage] = Field(min_length=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast for training; auto: bf16 where the GPU or CPU computes it natively")
    max_length: int = Field(512, ge=16)
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int = Field(50, ge=1)
    save_every: int = Field(50, ge=1)
    max_eval_records: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _stage_names_unique(self) -> Recipe:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self


def _set_path(doc: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists; list indices are integers."""
    keys = dotted.split(".")
    node: Any = doc
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"{where}: {'.'.join(keys[:i + 1])!r} is not an index of a {len(node)}-item list")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise RecipeError(f"{where}: cannot set {dotted!r}: {'.'.join(keys[:i])!r} is a value, not a section")


def apply_overrides(doc: dict[str, Any], overrides: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (values parsed as YAML scalars) to a recipe document."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.0.max_steps=20")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_path(doc, key.strip(), value, f"--set {item!r}")
    return doc


def _section(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class of the recipe section that holds ``loc``'s last key (for naming the keys it allows)."""
    import typing

    node: Any = Recipe
    for key in loc[:-1]:
        if isinstance(key, int):
            continue  # a list item: the list's element type was taken with the list's key
        field = getattr(node, "model_fields", {}).get(key)
        if field is None:
            return None
        ann = field.annotation
        for arg in (ann, *typing.get_args(ann)):
            inner = typing.get_args(arg)[0] if typing.get_origin(arg) is list else arg
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                node = inner
                break
        else:
            return None
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            section = _section(tuple(e["loc"]))
            allowed = f" (allowed here: {', '.join(section.model_fields)})" if section else ""
            parts.append(f"{loc}: unknown key{allowed}")
        elif e["type"] == "missing":
            parts.append(f"{loc}: required key missing")
        else:
            parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def load_recipe(path: Path | str, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is reported in one RecipeError."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    text = read_text(path, "a recipe (UTF-8 YAML text)", RecipeError, "give the recipe's YAML file, saved as UTF-8")
    try:
        doc = yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(f"{path}: the YAML is nested too deeply to be a recipe") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (model:, stages:, ...), got {type(doc).__name__}")
    doc = apply_overrides(doc, overrides)
    try:
        return Recipe.model_validate(doc)
    except ValidationError as e:
        n = len(e.errors())
        raise RecipeError(f"{path}: {n} problem{'s' * (n > 1)}: {_format_errors(e)}; the recipes shipped in "
                          "edgemed/recipes/ show every section") from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run folder records)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

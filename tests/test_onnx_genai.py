"""onnxruntime-genai opens `export onnx` folders: ``genai_config.json`` for the text decoders, none (and the reason)
for image models.

Each text export is run by ``og.Model(folder)`` and its generator, greedy, and compared with edgemed's own
onnxruntime backend on the same folder (tokens equal, logits to 1e-4) and with PyTorch on the model it was exported
from (fp32: tokens equal; int4: the random tiny models' near-ties flip under 4-bit rounding, so there only the
embedded model, whose logits are decided, is held to PyTorch's tokens).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXT_ARCHS, VISION_ARCHS

from edgemed.archs import REGISTRY
from edgemed.artifacts import read_manifest

og = pytest.importorskip("onnxruntime_genai")

N_TOKENS = 12
PROMPT_REL = 1e-5  # genai against edgemed's backend on the same graph: the prompt's logits, one prefill in both
FP32_REL = 1e-5  # fp32 genai against PyTorch (measured <= 9.6e-7 on the tiny models)
QUESTIONS = ("Is there a lesion in the left lung? Answer with one word.", "Describe the image. 0 1 2 3 10 100")


def export(model_dir: Path, out: Path, quant: str) -> Path:
    from edgemed.export.onnx import export_onnx

    return export_onnx(model_dir, quant, out)


def open_backend(folder: Path):
    from edgemed.backends import open_model

    return open_model(folder, n_threads=2)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """``exported(arch, quant)`` -> export folder of the tiny model, made once."""
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, quant: str = "fp32") -> Path:
        if (arch, quant) not in cache:
            cache[arch, quant] = export(tiny_model(arch), tmp_path_factory.mktemp("genai") / f"{arch}-{quant}", quant)
        return cache[arch, quant]

    return get


def genai_greedy(model, tokens: list[int], n: int, adapters=None, adapter: str | None = None
                 ) -> tuple[list[int], np.ndarray]:
    """(greedy tokens, logits of the prompt and of each generated token but the last) from onnxruntime-genai."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(tokens) + n, do_sample=False)
    gen = og.Generator(model, params)
    if adapter is not None:
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(np.array([tokens], dtype=np.int32))
    out, rows = [], []
    while not gen.is_done():
        gen.generate_next_token()  # runs the decoder on what came last (the prompt first), then picks a token
        out.append(int(gen.get_next_tokens()[0]))
        rows.append(np.array(gen.get_output("logits"))[0])
    return out, np.concatenate(rows)


def greedy(backend, tokens: list[int], n: int) -> list[int]:
    """An edgemed backend's greedy ids from its own decode loop (the KV cache step by step, as genai runs), ending
    on its stop ids as genai ends on the config's."""
    from edgemed.backends.base import GenParams

    ids = backend._token_ids(tokens, None, GenParams(max_tokens=n))
    out: list[int] = []
    for t in ids:
        out.append(int(t))
        if t in backend.eos_ids or len(out) == n:
            return out
    return out


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_against_backends(folder: Path, source: Path, quant: str, n: int = N_TOKENS,
                           questions: tuple[str, ...] = QUESTIONS) -> None:
    """genai on ``folder`` against edgemed's onnxruntime backend on it and PyTorch on ``source``."""
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ours, torch = open_backend(folder), open_backend(source)
    try:
        for q in questions:
            prompt = ours.render(q)
            tokens = ours.tokenize(prompt)
            assert list(tokenizer.encode(prompt)) == tokens, "genai's tokenizer reads the folder's files differently"
            got, logits = genai_greedy(model, tokens, n)
            want = greedy(ours, tokens, n)
            assert got == want, f"{q!r}: genai {got} vs edgemed's onnxruntime backend {want}"
            ref = ours.logits(tokens)  # the prompt's rows: both run it as one prefill
            err = rel(logits[: len(tokens)], ref)
            assert err <= PROMPT_REL, f"genai's prompt logits {err:.2e} from edgemed's backend"
            if quant == "fp32":
                assert got == greedy(torch, tokens, n), f"{q!r}: genai {got} vs PyTorch"
                assert rel(logits, torch.logits(tokens + got[:-1])) <= FP32_REL
    finally:
        ours.close()
        torch.close()


# ---------------------------------------------------------------- tiny text decoders
@pytest.mark.parametrize("quant", ["fp32", "int4"])
@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_genai_generates_what_edgemed_and_pytorch_do(arch, quant, exported, tiny_model):
    folder = exported(arch, quant)
    genai = read_manifest(folder, ("onnx",))["graphs"]["decoder"]["genai"]
    assert genai["config"] == "genai_config.json" and (folder / "genai_config.json").is_file(), genai
    assert "genai_config.json" in read_manifest(folder)["files"]  # sealed with the rest of the folder
    check_against_backends(folder, tiny_model(arch), quant)


def test_config_names_the_graphs_real_inputs_and_the_stop_ids(exported):
    folder = exported("llama")
    cfg = json.loads((folder / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["filename"] == "decoder.onnx"
    assert dec["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    assert dec["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                              "present_value_names": "present.%d.value"}
    text = json.loads((folder / "config.json").read_text())
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["num_attention_heads"], dec["head_size"]) == (
        text["num_hidden_layers"], text["num_key_value_heads"], text["num_attention_heads"],
        text["hidden_size"] // text["num_attention_heads"])
    b = open_backend(folder)
    try:
        eos = cfg["model"]["eos_token_id"]
        assert (eos if isinstance(eos, list) else [eos]) == b.eos_ids
    finally:
        b.close()


def _corrupt(folder: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / f"corrupt-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, out)
    cfg = json.loads((out / "genai_config.json").read_text())
    edit(cfg)
    (out / "genai_config.json").write_text(json.dumps(cfg))
    return out


def _run(folder: Path, tokens: list[int]) -> list[int]:
    return genai_greedy(og.Model(str(folder)), tokens, N_TOKENS)[0]


def test_a_wrong_config_is_refused_or_answers_differently(exported, tmp_path):
    """The config is what genai runs by: a wrong head size or cache name is refused, a wrong stop id changes the
    answer. (genai 0.18 takes the KV heads and layer count from the graph's own shapes: a wrong count there is
    not even read.)"""
    folder = exported("gemma3_text")  # its tiny model's greedy answer is not one repeated token
    tokens = [2, 10, 20, 30, 40]
    good = _run(folder, tokens)
    assert len(set(good)) > 1, good

    def head_size(c):
        c["model"]["decoder"]["head_size"] //= 2

    with pytest.raises(Exception, match="head dimension"):
        _run(_corrupt(folder, tmp_path, head_size), tokens)

    def cache_names(c):
        c["model"]["decoder"]["inputs"]["past_key_names"] = "past.%d.key"

    with pytest.raises(Exception, match="Missing Input: past_key_values.0.key"):
        _run(_corrupt(folder, tmp_path, cache_names), tokens)

    def stop_at_third(c):
        c["model"]["eos_token_id"] = good[2]

    cut = _run(_corrupt(folder, tmp_path, stop_at_third), tokens)
    assert cut == good[: good.index(good[2]) + 1] != good


# ---------------------------------------------------------------- what gets no config
@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_image_models_get_no_config_and_the_reason(arch, tmp_path):
    """No config that would open and answer differently from the graphs edgemed checks; one copied from the source
    folder is removed, as it describes other graphs."""
    from edgemed.export.onnx_genai import write_genai_config

    (tmp_path / "genai_config.json").write_text("{}")
    entry = write_genai_config(tmp_path, REGISTRY[arch], {"file": "decoder.onnx"})
    assert entry["config"] is None and entry["reason"].startswith(f"no genai_config.json: {arch} is an image model")
    assert not (tmp_path / "genai_config.json").exists()


def test_extra_graph_inputs_are_named_and_get_no_config(exported, tmp_path):
    """A decoder input genai does not feed (token types here) means no config, and the reason names it."""
    import onnx
    from onnx import TensorProto, helper

    from edgemed.export.onnx_genai import write_genai_config

    folder = tmp_path / "extra"
    shutil.copytree(exported("llama"), folder)
    m = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    m.graph.input.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]))
    onnx.save(m, str(folder / "decoder.onnx"))
    entry = write_genai_config(folder, REGISTRY["llama"], {"file": "decoder.onnx"})
    assert entry["config"] is None and "token_type_ids" in entry["reason"], entry
    assert not (folder / "genai_config.json").exists()


# ---------------------------------------------------------------- the embedded model (real weights)
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_embedded_model_answers_the_same_through_genai(quant, embedded_text, tmp_path):
    folder = export(embedded_text, tmp_path / quant, quant)
    check_against_backends(folder, embedded_text, "fp32" if quant == "fp32" else "int4", n=24,
                           questions=("What organ pumps blood through the body?",))
    if quant == "int4":  # decided logits: the 4-bit export keeps PyTorch's greedy answer
        model, torch = og.Model(str(folder)), open_backend(embedded_text)
        try:
            tokens = torch.tokenize(torch.render("What organ pumps blood through the body?"))
            got = genai_greedy(model, tokens, 16)[0]
            assert got == greedy(torch, tokens, 16)
            text = og.Tokenizer(model).decode(np.array(got, dtype=np.int32))
            assert text == torch.tokenizer.decode(got, skip_special_tokens=True) and len(text) > 20
        finally:
            torch.close()


# ---------------------------------------------------------------- og.Adapters: one int4 base, an adapter file per run
def _finetune(base: Path, root: Path, answer: str, decoder: str = "lora") -> Path:
    """A tiny fine-tune that answers ``answer`` to every question, merged (LoRA B starts non-zero: real work)."""
    from edgemed.merge import merge
    from edgemed.recipe import Recipe
    from edgemed.train import finetune

    root.mkdir(parents=True)
    recs = [{"question": q, "answer": answer, "answer_type": "open", "image": None}
            for q in ("Which side?", "Where is it?", "Which side is bright?", "Say it.")]
    (root / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    recipe = Recipe.model_validate({
        "model": {"path": str(base)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": "nonzero"},
        "optim": {"lr": 1e-2, "batch_size": 2, "warmup_ratio": 0.0},
        "stages": [{"name": "s", "data": {"train": str(root / "vqa.jsonl")}, "max_steps": 8,
                    "train": {"vision": "frozen", "projector": "frozen", "decoder": decoder}}]})
    return merge(finetune(recipe, root / "run"), root / "merged", check=False)


@pytest.fixture(scope="module")
def adapters_export(tiny_model, tmp_path_factory):
    """(export folder, {name: merged folder}): two fine-tunes of the tiny Llama with opposite answers, exported by
    `edgemed export onnx-adapters` (the command line drives export_genai_adapters)."""
    from click.testing import CliRunner

    from edgemed.cli import main

    root = tmp_path_factory.mktemp("genai-adapters")
    merged = {side: _finetune(tiny_model("llama"), root / side, side) for side in ("left", "right")}
    args = [f for n, m in merged.items() for f in ("--adapter", f"{n}={m}")]
    r = CliRunner().invoke(main, ["export", "onnx-adapters", *args, "--out", str(root / "export")])
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip().splitlines()[-1]) == root / "export"  # the command prints the folder it wrote
    return root / "export", merged


def test_adapters_switch_per_generator_and_equal_each_merged_export(adapters_export, tmp_path):
    """og.Adapters loads each run's file onto the one int4 base; a generator with an adapter gives the greedy
    tokens of that run's own int4 export (edgemed's backend) and of PyTorch on the merged model, one without gives
    the base's, and two generators with different adapters, stepped in turn, each keep their own."""
    from edgemed.artifacts import sha256_file
    from edgemed.export.onnx_genai_adapters import SUFFIX

    folder, merged = adapters_export
    manifest = read_manifest(folder, ("onnx",))
    assert set(manifest["adapters"]) == set(merged)
    for name, entry in manifest["adapters"].items():
        assert entry["file"] == f"adapters/{name}{SUFFIX}" and sha256_file(folder / entry["file"]) == entry["sha256"]
        assert entry["weights"] > 0 and entry["merge"]["path"] == str(merged[name])
    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    for name in merged:
        adapters.load(str(folder / "adapters" / f"{name}{SUFFIX}"), name)
    base = open_backend(folder)
    try:
        tokens = base.tokenize(base.render("Which side?"))
        answers = {name: genai_greedy(model, tokens, 6, adapters, name)[0] for name in merged}
        assert genai_greedy(model, tokens, 6)[0] == greedy(base, tokens, 6)  # no adapter: the base
    finally:
        base.close()
    assert answers["left"] != answers["right"], answers
    for name, m in merged.items():
        from edgemed.export.onnx import export_onnx

        # the merge's int4 export, uncalibrated as the adapters' base is: the same base, its change in the graph
        own = export_onnx(m, "int4", tmp_path / name, calibrate=False)
        # the same int4 graph math: every token; PyTorch (fp32): the trained answer's first tokens, since after them
        # a tiny random model's near-ties move with the CPU's int8 activation rounding (seen on an AMD EPYC)
        for ref_folder, n in ((own, 6), (m, 3)):
            ref = open_backend(ref_folder)
            try:
                assert answers[name][:n] == greedy(ref, tokens, n), f"{name}: genai with the adapter vs {ref_folder}"
            finally:
                ref.close()
    gens = {}
    for name in merged:  # both alive at once, on one model: switching is per generator, not a reload
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(tokens) + 6, do_sample=False)
        gens[name] = og.Generator(model, params)
        gens[name].set_active_adapter(adapters, name)
        gens[name].append_tokens(np.array([tokens], dtype=np.int32))
    stepped = {name: [] for name in gens}
    while not all(g.is_done() for g in gens.values()):
        for name, g in gens.items():
            if not g.is_done():
                g.generate_next_token()
                stepped[name].append(int(g.get_next_tokens()[0]))
    assert stepped == answers


def test_runs_an_adapter_cannot_carry_are_refused(adapters_export, tiny_model, tmp_path):
    """Trained norms (no LoRA) and fine-tunes of different bases are refused before any export, with the reason."""
    from edgemed.errors import ExportError
    from edgemed.export.onnx_genai_adapters import export_genai_adapters

    _, merged = adapters_export
    norms = _finetune(tiny_model("llama"), tmp_path / "norms", "left", decoder="layernorm")
    with pytest.raises(ExportError, match="is not a LoRA merge"):
        export_genai_adapters({"norms": norms}, tmp_path / "out")
    other = _finetune(tiny_model("llama", seed=1), tmp_path / "other", "left")
    with pytest.raises(ExportError, match="start from different base models"):
        export_genai_adapters({"left": merged["left"], "other": other}, tmp_path / "out")
    with pytest.raises(ExportError, match="adapter name 'a/b'"):
        export_genai_adapters({"a/b": other}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _graph(path: Path, w: np.ndarray, norm: np.ndarray, head: np.ndarray) -> Path:
    """x -> MatMul(W) -> Mul(norm) -> MatMul(head): a projection, a norm and an LM head, as a decoder has them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "proj.MatMul.weight"], ["h"], name="/proj/MatMul"),
             helper.make_node("Mul", ["h", "norm.weight"], ["n"], name="/norm/Mul"),
             helper.make_node("MatMul", ["n", "lm_head.MatMul.weight"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(w, "proj.MatMul.weight"),
                               numpy_helper.from_array(norm, "norm.weight"),
                               numpy_helper.from_array(head, "lm_head.MatMul.weight")])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_changes_other_than_low_rank_projections_are_refused(tmp_path):
    """Only a low-rank change of a decoder projection becomes adapter factors; a norm, the LM head, a full-rank
    change or no change at all is refused with the tensor's name."""
    from edgemed.errors import ExportError
    from edgemed.export.onnx_genai_adapters import _run_factors, _Weights

    rng = np.random.default_rng(0)
    w, norm, head = rng.standard_normal((64, 64), np.float32), np.ones(64, np.float32), rng.standard_normal(
        (64, 8), np.float32)
    ref = _Weights(_graph(tmp_path / "base.onnx", w, norm, head))
    u, v = rng.standard_normal((64, 2), np.float32), rng.standard_normal((2, 64), np.float32) * 0.01
    f = _run_factors("r", tmp_path, ref, _graph(tmp_path / "lora.onnx", w + u @ v, norm, head), 8)
    (a, b), = f.values()
    assert list(f) == ["proj.MatMul.weight"] and a.shape == (64, 2) and np.allclose(a @ b, u @ v, atol=1e-5)
    cases = {"norm.weight.*not a decoder projection": (w, norm * 1.1, head),
             "lm_head.MatMul.weight.*not a decoder projection": (w, norm, head * 1.1),
             "change of 'proj.MatMul.weight' is not of rank <= 8": (w + rng.standard_normal((64, 64), np.float32),
                                                                    norm, head),
             "equals the base's": (w, norm, head)}
    for i, (match, arrays) in enumerate(cases.items()):
        with pytest.raises(ExportError, match=match):
            _run_factors("r", tmp_path, ref, _graph(tmp_path / f"{i}.onnx", *arrays), 8)


def test_cli_refuses_a_bad_adapter_spec(tmp_path):
    from click.testing import CliRunner

    from edgemed.cli import main

    r = CliRunner().invoke(main, ["export", "onnx-adapters", "--adapter", "no-equals-sign",
                                  "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "NAME=DIR" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()

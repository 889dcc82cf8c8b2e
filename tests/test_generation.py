"""What every backend shares (edgemed.backends.base and .hf): the stream loop, stop strings, the Backend protocol,
the ids an answer ends on, and ignore_eos (speed probes rely on it)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import answer

from edgemed.backends.base import Backend, Chunk, GenParams, cut_at_stop, protocol_gaps, stream_text
from edgemed.errors import DataError


def test_cut_at_stop_holds_back_a_possible_stop():
    assert cut_at_stop("Hello wor", "", ["world!"]) == ("Hello ", False)
    assert cut_at_stop("Hello world! more", "Hello ", ["world!"]) == ("", True)
    assert cut_at_stop("abc", "", []) == ("abc", False)


def _collect(token_ids, detokenize, stops) -> tuple[list[str], str | None]:
    """(the non-empty texts of the chunks stream_text yields, as generate gives them; the last chunk's reason)."""
    chunks = list(stream_text(token_ids, detokenize, stops))
    assert all(c.finish_reason is None for c in chunks[:-1])
    return [c.text for c in chunks if c.text], chunks[-1].finish_reason


def test_stream_text_stops_at_a_stop_string_and_closes_the_token_stream():
    closed: list[bool] = []
    pieces = ["He", "llo", " E", "ND", " after", " more"]

    def ids():
        try:
            yield from range(6)
            return "length"
        finally:
            closed.append(True)

    got, reason = _collect(ids(), lambda ids: "".join(pieces[i] for i in ids), ["END"])
    assert got == ["He", "llo", " "] and reason == "stop" and closed == [True]


def test_stream_text_waits_for_split_characters_and_flushes_what_it_held():
    texts = {(0,): "caf", (0, 1): "caf\ufffd", (0, 1, 2): "caf\u00e9 E"}  # token 1 is half of the e-acute

    def ids():
        yield from range(3)
        return "stop"  # end of turn

    got, reason = _collect(ids(), lambda ids: texts[tuple(ids)], ["END"])
    assert got == ["caf", "\u00e9 ", "E"] and reason == "stop"  # "E" held (it may start END), then flushed


# ---------------------------------------------------------------- the Backend protocol


class _NamesOnly:
    """Every protocol name, so ``isinstance(.., Backend)`` holds; but wrong kinds and other parameters."""

    name, is_vision, folder, tokenizer, processor, arch, eos_ids, image_token_id = (
        "pytorch", "no", "/models/x", None, None, None, 2, None)

    def render(self, question):  # no image or system
        return question

    def chat_template(self):
        return ""

    def tokenize(self, text):
        return []

    def logits(self, tokens, image=None):
        return np.zeros((0, 1), np.float32)

    def image_embeddings(self, image):
        return np.zeros((0, 1), np.float32)

    def stream(self, prompt, image=None):  # no params
        return iter(())

    def generate(self, prompt, image=None, params=None):
        return iter(())

    def close(self):
        pass


class _NoClose(_NamesOnly):
    close = None  # type: ignore[assignment]


def test_protocol_gaps_bites_where_isinstance_does_not():
    assert isinstance(_NamesOnly(), Backend)  # names are all a runtime-checkable Protocol asks for
    assert protocol_gaps(_NamesOnly()) == [
        "is_vision is 'no', not bool", "folder is '/models/x', not Path", "eos_ids is 2, not list",
        "render(question) does not take the protocol's (self, question: 'str', *, image: 'bool' = False, "
        "system: 'str | None' = None) -> 'str'",
        "stream(prompt, image=None) does not take the protocol's (self, prompt: 'str', image: 'Image.Image | None' "
        "= None, params: 'GenParams | None' = None) -> 'Iterator[Chunk]'"]
    assert "no method close" in protocol_gaps(_NoClose())
    assert protocol_gaps(object()) == [f"no attribute {a}" for a in Backend.__annotations__] + [
        f"no method {m}" for m in ("render", "chat_template", "tokenize", "logits", "image_embeddings", "stream",
                                   "generate", "close")]


def behaviour_gaps(backend, image=None) -> list[str]:
    """What each protocol member of a backend does wrong on one short question (empty: all behave)."""
    gaps = []
    prompt = backend.render("Is it large?", image=image is not None, system="Be brief.")
    if not (isinstance(prompt, str) and "Is it large?" in prompt):
        gaps.append(f"render gave {prompt!r}")
    if not isinstance(backend.chat_template(), str) or not backend.chat_template():
        gaps.append("chat_template gave no template")
    tokens = backend.tokenize(prompt)
    if not (tokens and all(isinstance(t, int) for t in tokens)):
        gaps.append(f"tokenize gave {tokens!r}")
    logits = backend.logits(tokens, image)
    if logits.dtype != np.float32 or logits.ndim != 2 or logits.shape[0] != len(tokens):
        gaps.append(f"logits gave {logits.dtype} {logits.shape} for {len(tokens)} tokens")
    if image is not None and backend.image_embeddings(image).ndim != 2:
        gaps.append("image_embeddings are not [n, hidden]")
    if image is None and backend.is_vision is False:
        try:
            backend.image_embeddings(None)
            gaps.append("a text model gave image embeddings")
        except DataError:
            pass
    params = GenParams(max_tokens=3, ignore_eos=True)
    chunks = list(backend.stream(prompt, image, params))
    if not (all(isinstance(c, Chunk) for c in chunks) and chunks[-1].finish_reason == "length"
            and chunks[-1].tokens == 3):
        gaps.append(f"stream gave {chunks!r}")
    if "".join(backend.generate(prompt, image, params)) != "".join(c.text for c in chunks):
        gaps.append("generate does not give stream's text")
    return gaps


# ---------------------------------------------------------------- the ids an answer ends on

PROMPTS = ("The chest radiograph shows", "Hello, how are you")  # raw text: the tiny model repeats its last token


@pytest.fixture(scope="module")
def two_eos(tiny_model, tmp_path_factory):
    """The tiny llama with a generation_config.json that lists two eos ids (as Gemma 3 and Llama 3 do): the
    tokens its greedy answers to PROMPTS start with, neither of them special nor the tokenizer's eos. Returns
    (the edited folder, its GGUF export, its ONNX export, the two ids)."""
    from edgemed.backends.pytorch import TorchBackend
    from edgemed.export.gguf import export_gguf
    from edgemed.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("two-eos")
    plain = TorchBackend(tiny_model("llama"), device="cpu")
    try:
        firsts = [int(plain.logits(plain.tokenize(p))[-1].argmax()) for p in PROMPTS]
        assert len(set(firsts)) == 2 and not set(firsts) & set(plain.eos_ids), (firsts, plain.eos_ids)
        for p in PROMPTS:  # without the edit neither stops: the test below can fail
            assert answer(plain, p, None, GenParams(max_tokens=4))[1:] == ("length", 4)
    finally:
        plain.close()
    model = root / "model"
    shutil.copytree(tiny_model("llama"), model)
    gc = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gc, "eos_token_id": firsts}))
    return model, export_gguf(model, ["f32"], root / "gguf"), export_onnx(model, "fp32", root / "onnx"), firsts


def test_every_backend_stops_on_either_generation_config_eos(two_eos):
    from edgemed.backends import open_model

    model, gguf, onnx, firsts = two_eos
    for folder in (model, gguf, onnx):
        b = open_model(folder, n_threads=1)
        try:
            assert b.eos_ids == [*firsts, b.tokenizer.eos_token_id], (b.name, b.eos_ids)
            for p in PROMPTS:
                assert answer(b, p, None, GenParams(max_tokens=4)) == ("", "stop", 0), (b.name, p)
                assert answer(b, p, None, GenParams(max_tokens=4, ignore_eos=True))[1:] == ("length", 4), b.name
        finally:
            b.close()


def test_the_gguf_file_alone_ends_generation_on_every_eos_id(two_eos):
    """What llama.cpp's own tools (llama-server, llama-cli) stop on, from the GGUF file without edgemed."""
    import llama_cpp

    from edgemed.backends import open_model

    _, gguf, _, firsts = two_eos
    b = open_model(gguf, n_threads=1)
    try:
        assert [bool(llama_cpp.llama_vocab_is_eog(b._model.vocab, i)) for i in firsts] == [True, True]
    finally:
        b.close()


def test_end_of_turn_comes_from_the_chat_template(tiny_model, tmp_path):
    """The template's closing token joins the eos ids even where neither the tokenizer nor the generation
    settings name it; a base model (no template) has none."""
    from conftest import base_model
    from transformers import AutoTokenizer

    from edgemed import prompting

    for arch, closing in (("llama", "<|im_end|>"), ("gemma3_text", "<end_of_turn>")):
        tok = AutoTokenizer.from_pretrained(tiny_model(arch))
        assert prompting.end_of_turn(tok, tok, typed=False) == tok.convert_tokens_to_ids(closing)
        tok.eos_token = tok.pad_token  # a tokenizer whose eos is not the end of turn
        assert prompting.end_of_turn(tok, tok, typed=False) == tok.convert_tokens_to_ids(closing)
    base = AutoTokenizer.from_pretrained(base_model(tiny_model("llama"), tmp_path / "base"))
    assert prompting.end_of_turn(base, base, typed=False) is None


def test_stop_ids_are_the_union_of_the_three_sources(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from edgemed.backends.hf import stop_ids
    from edgemed.modeling import generation_eos

    folder = tiny_model("gemma3_text")
    tok = AutoTokenizer.from_pretrained(folder)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert generation_eos(folder) == [tok.eos_token_id, eot]  # [1, 106] in Gemma 3's own generation_config
    assert stop_ids(folder, tok, tok, False) == [tok.eos_token_id, eot]  # each once
    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 7}))
    assert generation_eos(bare) == [7]  # no generation_config.json: the model config's, as transformers reads it
    assert stop_ids(bare, tok, tok, False) == [7, tok.eos_token_id, eot]
    assert generation_eos(tmp_path) == []


@pytest.mark.slow
def test_ignore_eos_decodes_past_end_of_turn(embedded_text, tmp_path):
    from edgemed.backends.llamacpp import LlamaCppBackend
    from edgemed.backends.pytorch import TorchBackend
    from edgemed.export.gguf import export_gguf

    gguf = export_gguf(embedded_text, ["q8_0"], tmp_path / "g")
    for backend in (TorchBackend(embedded_text), LlamaCppBackend(gguf, quant="q8_0")):
        try:
            prompt = backend.render("What is the capital of France? Answer in one short sentence.")
            short = "".join(backend.generate(prompt, params=GenParams(max_tokens=40)))
            long = "".join(backend.generate(prompt, params=GenParams(max_tokens=40, ignore_eos=True)))
            n_short, n_long = len(backend.tokenize(short)), len(backend.tokenize(long))
            assert "Paris" in short and n_short < 30, (backend.name, short)
            assert n_long >= 30 and long.startswith(short.rstrip()), (backend.name, long)
        finally:
            backend.close()

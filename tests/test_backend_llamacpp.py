"""The llama.cpp backend's protocol behaviour on tiny GGUF exports: dispatch, quant choice, greedy decoding, seeds,
stop strings and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import answer
from test_generation import behaviour_gaps

from edgemed.backends import open_model
from edgemed.backends.base import GenParams, protocol_gaps
from edgemed.errors import ArtifactError, DataError

QUESTION = "Which side is the abnormality on?"


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory):
    from edgemed.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("llamacpp")
    return {"text": export_gguf(tiny_model("llama"), ["f32", "q8_0"], root / "text"),
            "image": export_gguf(tiny_model("llava"), ["f32"], root / "image")}


@pytest.fixture(scope="module")
def text(folders):
    b = open_model(folders["text"], n_threads=2, n_ctx=512)
    yield b
    b.close()


def test_open_model_dispatches_on_the_manifest_and_picks_the_quant(folders, text):
    from edgemed.backends.llamacpp import LlamaCppBackend

    assert isinstance(text, LlamaCppBackend) and protocol_gaps(text) == [] and behaviour_gaps(text) == []
    assert text.name == "llamacpp" and not text.is_vision and text.quant == "f32"
    view = text.with_adapter(None)  # the bare base through an adapter view: the same protocol and answers
    assert protocol_gaps(view) == [] and behaviour_gaps(view) == []
    prompt = text.render(QUESTION)
    assert answer(view, prompt, None, GenParams(max_tokens=6)) == answer(text, prompt, None, GenParams(max_tokens=6))
    q8 = open_model(folders["text"], quant="q8_0", n_ctx=256)
    try:
        assert q8.path.name == "model-q8_0.gguf"
    finally:
        q8.close()
    with pytest.raises(ArtifactError, match="f32, q8_0"):
        open_model(folders["text"], quant="q4_k_m")


def test_greedy_generation_follows_the_logits(text):
    prompt = text.render(QUESTION)
    tokens = text.tokenize(prompt)
    got, finish, n = answer(text, prompt, None, GenParams(max_tokens=10))
    chain = list(tokens)
    for _ in range(10):  # argmax of teacher-forced logits, token by token
        nxt = int(text.logits(chain)[-1].argmax())
        if nxt == text.tokenizer.eos_token_id:
            break
        chain.append(nxt)
    want = text.tokenizer.decode(chain[len(tokens):], skip_special_tokens=True)
    assert got == want
    assert finish == ("length" if len(chain) - len(tokens) == 10 else "stop") and n == len(chain) - len(tokens)


def test_seed_makes_sampling_repeatable(text):
    prompt = text.render(QUESTION)
    p = GenParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=11)
    a, b = "".join(text.generate(prompt, params=p)), "".join(text.generate(prompt, params=p))
    c = "".join(text.generate(prompt, params=GenParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=12)))
    assert a == b
    assert a != c  # near-uniform tiny model: two seeds give two answers


def test_stop_string_ends_the_answer_before_it(text):
    prompt = text.render(QUESTION)
    full = "".join(text.generate(prompt, params=GenParams(max_tokens=24, temperature=1.5, seed=3)))
    assert len(full) > 6
    stop = full[3:6]
    cut, finish, _ = answer(text, prompt, None, GenParams(max_tokens=24, temperature=1.5, seed=3, stop=[stop]))
    assert cut == full[:full.index(stop)] and finish == "stop"
    assert answer(text, prompt, None, GenParams(max_tokens=0)) == ("", "length", 0)


def test_refusals(text, folders):
    from PIL import Image

    img = Image.new("RGB", (32, 32), (120, 30, 200))
    with pytest.raises(DataError, match="takes no image"):
        text.render(QUESTION, image=True)
    with pytest.raises(DataError, match="takes no image"):
        text.logits(text.tokenize(text.render(QUESTION)), img)
    b = open_model(folders["image"], n_threads=2, n_ctx=512)
    try:
        assert b.is_vision and protocol_gaps(b) == [] and behaviour_gaps(b, img) == []
        no_placeholder = b.tokenize(b.render(QUESTION))
        with pytest.raises(DataError, match="exactly once"):
            b.logits(no_placeholder, img)
        emb = b.image_embeddings(img)
        assert emb.shape[1] == b.n_embd and np.isfinite(emb).all()
    finally:
        b.close()


def test_an_image_longer_than_the_batch_is_decoded_in_pieces_where_attention_is_causal(folders, tiny_model, tmp_path):
    """LLaVA-1.5 gives 576 image tokens against the default n_batch of 512 (the full-size chain's image question
    failed on it): causal image tokens are decoded in pieces, with the same logits as in one batch; Gemma 3's,
    which attend both ways, need one batch and a context too small for them is refused with the size to ask for."""
    from PIL import Image

    from edgemed.export.gguf import export_gguf

    img = Image.new("RGB", (32, 32), (120, 30, 200))
    whole = open_model(folders["image"], n_threads=1, n_ctx=512)
    try:
        ids = whole.tokenize(whole.render(QUESTION, image=True))
        n_img = whole.image_embeddings(img).shape[0]
        ref = whole.logits(ids, img)
    finally:
        whole.close()
    assert n_img > 3
    pieces = open_model(folders["image"], n_threads=1, n_ctx=512, n_batch=3)
    try:
        got = pieces.logits(ids, img)
    finally:
        pieces.close()
    assert got.shape == ref.shape and np.allclose(got, ref, atol=1e-3), float(np.abs(got - ref).max())
    gemma = export_gguf(tiny_model("gemma3"), ["f32"], tmp_path / "gemma")
    small = open_model(gemma, n_threads=1, n_ctx=512, n_batch=2)
    try:
        g_ids = small.tokenize(small.render(QUESTION, image=True))
        with pytest.raises(DataError, match="both ways.*n_batch of at least"):
            small.logits(g_ids, img)
    finally:
        small.close()

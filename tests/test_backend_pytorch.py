"""The PyTorch reference backend against transformers itself, on tiny models and the embedded default."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import ARCHS, VISION_ARCHS, answer
from PIL import Image
from test_generation import behaviour_gaps

from edgemed.backends.base import GenParams, protocol_gaps
from edgemed.backends.pytorch import TorchBackend
from edgemed.errors import DataError

QUESTION = "Is there a lesion in the left lung?"


def picture(seed: int, size=(40, 52)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[0], size[1], 3) * 255).astype("uint8"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (on a busy 2-core runner, 2 threads are 10-30x slower); restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_backend(tiny_model):
    b = TorchBackend(tiny_model("llama"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def image_backend(tiny_model):
    b = TorchBackend(tiny_model("llava"))
    yield b
    b.close()


def hf(folder):
    """The same folder loaded by transformers directly: the independent reference (model, processor or tokenizer)."""
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    from edgemed.archs import arch_for_dir

    arch = arch_for_dir(folder)  # also registers what a family needs before loading (Qwen2.5-VL)
    model = getattr(transformers, arch.model_class).from_pretrained(folder).eval()
    owner = AutoProcessor.from_pretrained(folder) if arch.is_vision else AutoTokenizer.from_pretrained(folder)
    return model, owner


@pytest.fixture(scope="module")
def backend_of(tiny_model):
    """``backend_of(arch)`` -> a TorchBackend on that architecture's tiny model, opened once per module."""
    opened: dict[str, TorchBackend] = {}

    def get(arch: str) -> TorchBackend:
        if arch not in opened:
            opened[arch] = TorchBackend(tiny_model(arch))
        return opened[arch]

    yield get
    for b in opened.values():
        b.close()


def test_is_a_backend_and_renders_with_the_models_template(text_backend, image_backend, tiny_model):
    from transformers import AutoProcessor, AutoTokenizer

    assert protocol_gaps(text_backend) == [] and protocol_gaps(image_backend) == []
    assert behaviour_gaps(text_backend) == [] and behaviour_gaps(image_backend, picture(5)) == []
    assert not text_backend.is_vision and image_backend.is_vision
    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    want = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
                                   add_generation_prompt=True, tokenize=False)
    assert text_backend.render(QUESTION, system="Be brief.") == want
    assert text_backend.tokenize(want) == tok(want, add_special_tokens=False).input_ids
    proc = AutoProcessor.from_pretrained(tiny_model("llava"))
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    want = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    assert image_backend.render(QUESTION, image=True) == want
    assert image_backend.tokenize(want).count(image_backend.image_token_id) == 1
    assert text_backend.chat_template() == tok.chat_template


def test_text_model_refuses_an_image(text_backend):
    with pytest.raises(DataError, match="takes no image"):
        text_backend.render(QUESTION, image=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_logits_equal_transformers(arch, backend_of, tiny_model):
    backend = backend_of(arch)
    model, _ = hf(tiny_model(arch))
    tokens = backend.tokenize(backend.render(QUESTION))
    got = backend.logits(tokens)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokens])).logits[0].numpy()
    assert got.shape == (len(tokens), want.shape[-1]) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_image_logits_rows_line_up_with_the_unexpanded_tokens(arch, backend_of, tiny_model):
    backend = backend_of(arch)
    model, proc = hf(tiny_model(arch))
    prompt = backend.render(QUESTION, image=True)
    tokens = backend.tokenize(prompt)
    img = picture(0)
    got = backend.logits(tokens, img)
    enc = proc(text=[prompt], images=[img], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        full = model(**enc).logits[0].numpy()
    k = tokens.index(backend.image_token_id)
    n_image = full.shape[0] - len(tokens) + 1  # what the placeholder became
    assert enc["input_ids"][0, :k].tolist() == tokens[:k]
    assert enc["input_ids"][0, k + n_image:].tolist() == tokens[k + 1:]
    rows = list(range(k)) + [k + n_image - 1] + list(range(k + n_image, full.shape[0]))
    assert got.shape == (len(tokens), full.shape[-1])
    np.testing.assert_allclose(got, full[rows], atol=1e-5, rtol=1e-5)
    other = backend.logits(tokens, picture(1, (64, 30)))
    assert np.abs(other[k:] - got[k:]).max() > 1e-4  # the image reaches the rows after it


class _MergingProcessor:
    """The model's processor, except that on a whole prompt the token before the image comes back as another id:
    what Gemma 3's real vocabulary does when the processor's "\\n\\n" joins the template's "\\n"."""

    def __init__(self, processor, question: str):
        self.processor, self.question = processor, question

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, text, images, **kw):
        enc = self.processor(text=text, images=images, **kw)
        if self.question in text[0]:
            ids = enc["input_ids"]
            ids[0, 0] = int(ids[0, 0]) + 1  # the prefix no longer equals tokenize()'s
        return enc


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_a_processor_that_merges_text_around_the_image_still_lines_up(arch, backend_of, monkeypatch):
    """When the processor's tokens around the image differ from tokenize()'s, the placeholder is expanded alone and
    spliced in: the same logits as the normal path (tiny tokenizers merge nothing, so both sequences are equal).
    Mllama's per-token cross-attention mask cannot be spliced, so it keeps the clear error."""
    backend = backend_of(arch)
    tokens = backend.tokenize(backend.render(QUESTION, image=True))
    want = backend.logits(tokens, picture(0)) if arch != "mllama" else None
    monkeypatch.setattr(backend, "processor", _MergingProcessor(backend.processor, QUESTION))
    if arch == "mllama":
        with pytest.raises(DataError, match="tokenized the prompt differently"):
            backend.logits(tokens, picture(0))
        return
    np.testing.assert_allclose(backend.logits(tokens, picture(0)), want, atol=1e-5, rtol=1e-5)


def test_llava_expands_its_placeholder_into_image_tokens(image_backend, tiny_model):
    _, proc = hf(tiny_model("llava"))
    prompt = image_backend.render(QUESTION, image=True)
    enc = proc(text=[prompt], images=[picture(0)], return_tensors="pt", add_special_tokens=False)
    n = (enc["input_ids"][0] == image_backend.image_token_id).sum().item()
    assert n == image_backend.image_embeddings(picture(0)).shape[0] == 16  # (32 px / 8 px patches)^2
    tokens = image_backend.tokenize(prompt)
    k = tokens.index(image_backend.image_token_id)
    a, b = image_backend.logits(tokens, picture(0)), image_backend.logits(tokens, picture(1))
    np.testing.assert_allclose(a[:k], b[:k], atol=1e-6)  # rows before the image do not see it (causal)


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_every_vision_family_gives_image_embeddings_of_decoder_width(arch, backend_of):
    backend = backend_of(arch)
    emb = backend.image_embeddings(picture(6))
    hidden = backend.arch.text_config(backend.model.config).hidden_size
    assert emb.ndim == 2 and emb.shape[0] > 0 and emb.shape[1] == hidden
    assert np.isfinite(emb).all() and np.abs(emb - backend.image_embeddings(picture(7))).max() > 1e-4


def test_image_embeddings_are_the_projected_features(image_backend, tiny_model):
    model, proc = hf(tiny_model("llava"))
    img = picture(2)
    got = image_backend.image_embeddings(img)
    pixels = proc.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model.model.get_image_features(pixel_values=pixels).pooler_output[0].numpy()
    n_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert got.shape == (n_tokens, model.config.text_config.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_answer_equals_transformers_generate(arch, backend_of, tiny_model):
    backend = backend_of(arch)
    model, owner = hf(tiny_model(arch))
    img = picture(3) if backend.is_vision else None
    prompt = backend.render(QUESTION, image=img is not None)
    if img is not None:
        enc = owner(text=[prompt], images=[img], return_tensors="pt", add_special_tokens=False)
        tok = owner.tokenizer
    else:
        enc = {"input_ids": torch.tensor([backend.tokenize(prompt)])}
        tok = owner
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=backend.eos_ids,
                             pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    ends = [i for i, t in enumerate(new) if t in backend.eos_ids]
    # an unfinished last character (byte-fallback tokens) is dropped, as the llama.cpp and ONNX runtimes do
    want = tok.decode(new[: ends[0]] if ends else new, skip_special_tokens=True).rstrip("\ufffd")
    assert "".join(backend.generate(prompt, img, GenParams(max_tokens=12))) == want


def test_seeded_sampling_is_reproducible_and_top_p_narrows(image_backend):
    prompt = image_backend.render(QUESTION, image=True)
    img = picture(4)

    def run(**kw) -> str:
        return "".join(image_backend.generate(prompt, img, GenParams(max_tokens=16, **kw)))

    a = run(temperature=1.0, seed=11)
    assert a == run(temperature=1.0, seed=11)
    assert a != run(temperature=1.0, seed=12)
    assert run(temperature=1.0, seed=13, top_p=1e-6) == run()  # only the top token survives: greedy


def test_stop_string_ends_the_answer_before_it(text_backend):
    prompt = text_backend.render(QUESTION)
    params = GenParams(max_tokens=24, temperature=1.0, seed=5)
    full, finish, tokens = answer(text_backend, prompt, None, params)
    assert finish == "length" and tokens == 24
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if full[i:i + 3].strip())
    cut = full.index(stop)
    params.stop = [stop]
    got, finish, tokens = answer(text_backend, prompt, None, params)
    assert got == full[:cut]
    assert finish == "stop" and tokens < 24


def test_closing_the_stream_stops_the_model(text_backend):
    prompt = text_backend.render(QUESTION)
    it = text_backend.generate(prompt, None, GenParams(max_tokens=400, temperature=1.0, seed=1))
    first = [next(it), next(it)]
    it.close()
    assert all(first)
    assert not [t for t in threading.enumerate() if t.name == "edgemed-generate"]
    # the model is free again at once
    assert "".join(text_backend.generate(prompt, None, GenParams(max_tokens=3)))


def test_a_prompt_without_its_placeholder_is_refused_with_an_image(image_backend):
    tokens = image_backend.tokenize(image_backend.render(QUESTION))
    with pytest.raises(DataError, match="exactly once"):
        image_backend.logits(tokens, picture(0))


def test_a_run_folder_answers_as_its_adapter_model(tiny_model, tmp_path):
    from conftest import write_vqa

    from edgemed.modeling import load_base, load_run
    from edgemed.recipe import Recipe
    from edgemed.train import finetune

    data = write_vqa(tmp_path / "data", n=4, image=True)
    recipe = Recipe.model_validate({
        "model": {"path": str(tiny_model("llava"))}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": "nonzero"},
        "optim": {"lr": 1e-2, "batch_size": 2},
        "stages": [{"name": "s", "data": {"train": str(data)}, "max_steps": 1,
                    "train": {"vision": "lora", "projector": "train", "decoder": "lora"}}]})
    run = finetune(recipe, tmp_path / "run")
    backend = TorchBackend(run)
    try:
        prompt = backend.render(QUESTION, image=True)
        tokens = backend.tokenize(prompt)
        img = picture(0)
        got = backend.logits(tokens, img)
        ref = load_run(run)
        enc = ref.processor(text=[prompt], images=[img], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            want = ref.model(**enc).logits[0].numpy()
            base = load_base(tiny_model("llava")).model(**enc).logits[0].numpy()
        k = tokens.index(backend.image_token_id)
        np.testing.assert_allclose(got[:k], want[:k], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got[k + 1:], want[-(len(tokens) - k - 1):], atol=1e-5, rtol=1e-5)
        assert np.abs(want - base).max() > 1e-3  # the adapter changes the answer: this compared something
        assert backend.image_embeddings(img).shape == (16, 64)
    finally:
        backend.close()


@pytest.mark.slow
def test_embedded_text_model_answers_and_ends_its_turn(embedded_text):
    b = TorchBackend(embedded_text)
    try:
        text, finish, tokens = answer(b, b.render("What is the capital of France? Answer in one sentence."), None,
                                      GenParams(max_tokens=48))
        assert "Paris" in text
        assert finish == "stop" and tokens < 48  # <|im_end|> ended it, not the token budget
        tokens = b.tokenize(b.render("What is the capital of France?"))
        logits = b.logits(tokens)
        assert logits.shape == (len(tokens), 49152)
    finally:
        b.close()


@pytest.mark.slow
def test_embedded_image_model_expands_its_sixteen_image_tokens(embedded_image):
    b = TorchBackend(embedded_image)
    try:
        emb = b.image_embeddings(picture(0, (80, 64)))
        assert emb.shape == (16, 576)
        tokens = b.tokenize(b.render("Describe the image.", image=True))
        assert b.logits(tokens, picture(0, (80, 64))).shape == (len(tokens), 49153)
    finally:
        b.close()

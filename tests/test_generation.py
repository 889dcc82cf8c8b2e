"""GenParams shared by every backend: ignore_eos decodes past the end of turn (speed probes rely on it)."""

from __future__ import annotations

import pytest

from edgemed.backends.base import GenParams, cut_at_stop


def test_cut_at_stop_holds_back_a_possible_stop():
    assert cut_at_stop("Hello wor", "", ["world!"]) == ("Hello ", False)
    assert cut_at_stop("Hello world! more", "Hello ", ["world!"]) == ("", True)
    assert cut_at_stop("abc", "", []) == ("abc", False)


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

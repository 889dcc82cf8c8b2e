"""GenParams shared by every backend: ignore_eos decodes past the end of turn (speed probes rely on it)."""

from __future__ import annotations

import pytest

from edgemed.backends.base import GenParams, cut_at_stop, stream_text


def test_cut_at_stop_holds_back_a_possible_stop():
    assert cut_at_stop("Hello wor", "", ["world!"]) == ("Hello ", False)
    assert cut_at_stop("Hello world! more", "Hello ", ["world!"]) == ("", True)
    assert cut_at_stop("abc", "", []) == ("abc", False)


@pytest.mark.slow
def _collect(token_ids, detokenize, stops):
    """(yielded pieces, finish reason) of stream_text."""
    out: list[str] = []

    def run():
        reason = yield from stream_text(token_ids, detokenize, stops)
        out.append(reason)

    got = list(run())
    return got, out[0]


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

"""The tokenizer of a GGUF text file: vocabulary, merges or scores, token types, special tokens and the chat
template, written as llama.cpp's tokenizer reads them, for the tokenizer kinds in :data:`TOKENIZER_KINDS`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgemed.errors import ExportError

# llama.cpp pre-tokenizer names for the byte-level BPE pre-tokenizers transformers writes in tokenizer.json,
# keyed by a signature of that JSON (see _pre_signature). convert_hf_to_gguf hashes a tokenization instead; a
# signature also recognises the small tokenizers tests train, whose hash no table holds.
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE = {
    "bytelevel+re": "gpt-2",  # GPT-2 regex (SmolLM2 as transformers saves it, the tiny test tokenizers)
    "digits1|bytelevel+re": "smollm",  # SmolLM2's hub tokenizer: digits split one by one, then GPT-2
    f"split:{LLAMA3_RE}|bytelevel": "llama-bpe",  # Llama 3.x
    f"split:{QWEN2_RE}|bytelevel": "qwen2",  # Qwen2, Qwen2.5(-VL)
}


def _pre_signature(pre: dict[str, Any] | None) -> str:
    if not pre:
        return "none"
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in items:
        t = p.get("type")
        if t == "ByteLevel":
            sig.append("bytelevel+re" if p.get("use_regex", True) else "bytelevel")
        elif t == "Digits":
            sig.append("digits1" if p.get("individual_digits") else "digits")
        elif t == "Split":
            pat = p.get("pattern", {})
            sig.append("split:" + (pat.get("Regex") or pat.get("String") or ""))
        else:
            sig.append(str(t))
    return "|".join(sig)


# The tokenizer kinds edgemed writes to GGUF: how each is recognised is tokenizer_kind, how each is written is
# add_tokenizer. Tests parametrise over this table.
TOKENIZER_KINDS = {
    "byte-level-bpe": "GPT-2 style byte-level BPE from tokenizer.json (SmolLM2, Llama 3, Qwen2)",
    "sentencepiece": "SentencePiece with byte fallback, from tokenizer.model (Gemma, Llama 2 as the hub ships them)",
    "bpe-byte-fallback": "SentencePiece-style BPE with byte fallback from tokenizer.json alone (Gemma saved by "
                         "transformers 5, hub checkpoints without tokenizer.model)",
}


def tokenizer_kind(model_dir: Path) -> str:
    """Which of :data:`TOKENIZER_KINDS` the folder's tokenizer is; an ExportError names what it has otherwise."""
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        if (model_dir / "tokenizer.model").is_file():
            return "sentencepiece"
        raise ExportError(f"{model_dir}: no tokenizer.json; the model folder must hold its tokenizer "
                          "(save it with tokenizer.save_pretrained)")
    try:
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{tj_path}: not valid JSON ({e}); save the tokenizer again") from None
    model = tj.get("model") or {}
    decoder = tj.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "byte-level-bpe"
    if (model_dir / "tokenizer.model").is_file():
        return "sentencepiece"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "bpe-byte-fallback"
    raise ExportError(f"{tj_path}: tokenizer model {model.get('type')!r} (byte_fallback "
                      f"{bool(model.get('byte_fallback'))}) is not supported for GGUF; supported: "
                      + "; ".join(TOKENIZER_KINDS.values()))


def add_tokenizer(w, model_dir: Path, n_vocab: int, chat_template: str | None = None) -> None:
    """Vocabulary, merges, special tokens and chat template (``chat_template`` or the folder's), as llama.cpp's
    tokenizer reads them."""
    kind = tokenizer_kind(model_dir)
    if kind == "byte-level-bpe":
        tj_path = model_dir / "tokenizer.json"
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        tokens, types = _bpe_tokens(model_dir, n_vocab)
        sig = _pre_signature(tj.get("pre_tokenizer"))
        pre = BPE_PRE.get(sig)
        if pre is None:
            raise ExportError(f"{tj_path}: pre-tokenizer {sig!r} has no llama.cpp equivalent known to edgemed; "
                              f"known: {', '.join(BPE_PRE)}")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        _special_vocab(model_dir, True, len(tokens)).add_to_gguf(w, quiet=True)
    else:
        if kind == "sentencepiece":
            tokens, scores, types = _spm_tokens(model_dir, n_vocab)
        else:
            tokens, scores, types = _hf_spm_tokens(model_dir, n_vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(_adds_space_prefix(model_dir))
        _special_vocab(model_dir, False, len(tokens)).add_to_gguf(w, quiet=True)
    template = chat_template if chat_template is not None else _chat_template(model_dir)
    if template:
        w.add_chat_template(template)  # the exact template the model was fine-tuned with


def _adds_space_prefix(model_dir: Path) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2's Prepend normalizer, Metaspace prepend_scheme).

    Gemma's tokenizers do not. Read from tokenizer.json; a folder with only tokenizer.model keeps llama.cpp's
    answer for SentencePiece models of this kind (no prefix), which edgemed has always written.
    """
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        return False
    tj = json.loads(tj_path.read_text(encoding="utf-8"))

    def steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        if not node:
            return []
        return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]

    for n in steps(tj.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
    for p in steps(tj.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never":
            return True
    return False


def _special_vocab(model_dir: Path, merges: bool, n_vocab: int):
    """gguf-py's merges and special-token ids; the chat template is added separately (chat_template.jinja)."""
    import gguf

    sv = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=n_vocab)
    sv.chat_template = None
    for k, v in _adds_bos_eos(model_dir).items():  # what gguf-py read from the files wins; else transformers'
        sv.add_special_token.setdefault(k, v)
    _extra_eos(model_dir, sv)
    return sv


def _extra_eos(model_dir: Path, sv) -> None:
    """generation_config.json's other eos ids (Gemma 3: 106, Llama 3: 128008/128009) as llama.cpp's eot and eom
    tokens, so llama.cpp's own tools stop where transformers does. gguf-py's SpecialVocab reads only the
    tokenizer's eos; GGUF has two such slots and no list, so a third extra id cannot be written (a warning says so)."""
    from edgemed.modeling import generation_eos

    extra = [i for i in generation_eos(model_dir) if i != sv.special_token_ids.get("eos")]
    for slot, i in zip(("eot", "eom"), extra, strict=False):
        sv.special_token_ids.setdefault(slot, i)
    if len(extra) > 2:
        import warnings

        from edgemed.errors import EdgemedWarning

        warnings.warn(f"{model_dir}: generation_config lists {len(extra)} eos ids besides the tokenizer's; a GGUF "
                      f"holds two (eot, eom), so {extra[2:]} are not in the file: edgemed's runtime stops on them, "
                      "llama.cpp's own tools will not", EdgemedWarning, stacklevel=2)


def _adds_bos_eos(model_dir: Path) -> dict[str, bool]:
    """Whether transformers puts BOS before and EOS after an encoded text, as this folder's tokenizer is loaded.

    Asked of transformers itself, for what gguf-py's reading of tokenizer_config.json and the tokenizer.json
    post-processor leaves unset (the tokenizer class's default).
    """
    tok = hf_tokenizer(model_dir)
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    out: dict[str, bool] = {}
    if tok.bos_token_id is not None:
        out["bos"] = bool(full[:1] == [tok.bos_token_id] and plain[:1] != [tok.bos_token_id])
    if tok.eos_token_id is not None:
        out["eos"] = bool(full[-1:] == [tok.eos_token_id] and plain[-1:] != [tok.eos_token_id])
    return out


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        p = model_dir / name
        if p.is_file():
            t = json.loads(p.read_text()).get("chat_template")
            if isinstance(t, str):
                return t
    return None


def replace_template(folder: Path, template: str) -> None:
    """Make ``template`` the one transformers reads from ``folder``: chat_template.jinja, no other copy."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        p = folder / name
        if p.is_file():
            data = json.loads(p.read_text(encoding="utf-8"))
            if data.pop("chat_template", None) is not None:
                p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _bpe_tokens(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token texts and types by id, padded to the embedding rows (convert_hf_to_gguf's get_vocab_base)."""
    import gguf

    tok = hf_tokenizer(model_dir)
    vocab = tok.get_vocab()
    if len(vocab) > n_vocab:
        raise ExportError(f"{model_dir}: the tokenizer has {len(vocab)} tokens but the embedding only {n_vocab} rows; "
                          "resize the model's embeddings to the tokenizer before export")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")  # embedding rows beyond the tokenizer (vocab padding)
            types.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, [int(t) for t in types]


def _spm_tokens(model_dir: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """SentencePiece pieces, scores and types (convert_hf_to_gguf's _create_vocab_sentencepiece)."""
    import gguf

    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise ExportError(f"{model_dir}: SentencePiece-style tokenizer without tokenizer.model; llama.cpp needs the "
                          "SentencePiece model file beside tokenizer.json")
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    size = sp.vocab_size()
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for i in range(min(size, n_vocab)):
        piece = sp.id_to_piece(i)
        tokens[i] = piece.encode("utf-8")
        scores[i] = sp.get_score(i)
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        types[i] = int(t)
    tok = hf_tokenizer(model_dir)
    for i, added in tok.added_tokens_decoder.items():
        if i >= n_vocab:
            raise ExportError(f"{model_dir}: added token {added.content!r} id {i} is beyond the {n_vocab} "
                              "embedding rows; resize the model's embeddings to the tokenizer before export")
        tokens[i] = added.content.encode("utf-8")
        scores[i] = -1000.0
        if types[i] in (int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.BYTE)):
            continue
        types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    return tokens, scores, types


def _hf_spm_tokens(model_dir: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and types of a SentencePiece-style BPE kept only as tokenizer.json (no tokenizer.model).

    Texts and base types come from gguf-py's ``LlamaHfVocab``. Its scores are a -1000 placeholder, but
    llama.cpp's SentencePiece tokenizer merges the pair of highest score first, so equal scores would merge left
    to right. tokenizer.json keeps SentencePiece's order as the rank of each merge, so a piece's score here is
    minus the rank of the merge that makes it (the same order as the scores in the SentencePiece model).
    Added tokens are typed as transformers holds them: special ones CONTROL, the others USER_DEFINED (llama.cpp
    then matches them whole, before tokenizing, as transformers does).
    """
    import gguf

    try:
        vocab = gguf.LlamaHfVocab(model_dir)
    except (FileNotFoundError, TypeError) as e:
        raise ExportError(f"{model_dir / 'tokenizer.json'}: not a SentencePiece-style BPE tokenizer gguf-py can "
                          f"read ({e})") from None
    base = vocab.vocab_size_base
    order = [i for i in range(base) if i not in vocab.added_tokens_ids]
    order += [vocab.added_tokens_dict[t] for t in vocab.added_tokens_list]
    if max(order, default=-1) >= n_vocab:
        raise ExportError(f"{model_dir}: the tokenizer has {max(order) + 1} tokens but the embedding only {n_vocab} "
                          "rows; resize the model's embeddings to the tokenizer before export")
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for i, (text, _score, ttype) in zip(order, vocab.all_tokens(), strict=True):
        tokens[i], types[i] = text, int(ttype)
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = tj["model"]["vocab"]
    for rank, merge in enumerate(tj["model"].get("merges") or []):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        i = ids.get(a + b)
        if i is not None and i < n_vocab and scores[i] == -1000.0:
            scores[i] = -float(rank)
    for i, t in enumerate(types):
        if t == int(gguf.TokenType.NORMAL) and scores[i] == -1000.0:
            scores[i] = 0.0  # single characters: never a merge result, any score works (SentencePiece gives 0)
    for i, added in vocab.tokenizer.added_tokens_decoder.items():
        if i < n_vocab and types[i] not in (int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.BYTE)):
            tokens[i] = added.content.encode("utf-8")
            scores[i] = -1000.0
            types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    unk = vocab.tokenizer.unk_token_id
    if unk is not None and unk < n_vocab:
        types[unk] = int(gguf.TokenType.UNKNOWN)
    return tokens, scores, types

"""One prompt renderer for training, export checks, evaluation and serving: the model's own chat template.

Image models get typed content (``{"type": "image"}`` parts), which their processors' templates turn into the
family's image placeholder; text models get plain string content, as their templates expect.

A base model (no chat template anywhere in its folder) is prompted with plain text: the system prompt, a blank
line, then the question, with no turn markers, as such a model was trained to continue text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def messages(question: str, *, image: bool = False, system: str | None = None, typed: bool = False,
             answer: str | None = None) -> list[dict[str, Any]]:
    """Chat messages for one question, with an optional system prompt and the answer turn for training."""
    if image and not typed:
        raise ValueError("an image question needs typed content (an image model)")

    def content(text: str, with_image: bool = False):
        if not typed:
            return text
        return ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]

    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": content(system)})
    out.append({"role": "user", "content": content(question, image)})
    if answer is not None:
        out.append({"role": "assistant", "content": content(answer)})
    return out


PLAIN = "plain"  # the prompt format of a model without a chat template, as reports name it
CHAT = "chat"


def has_template(template_owner: Any) -> bool:
    """Whether a tokenizer or processor carries a chat template (a base model's does not)."""
    owner_t = getattr(template_owner, "chat_template", None)
    inner = getattr(template_owner, "tokenizer", None)
    return bool(owner_t or getattr(inner, "chat_template", None))


def prompt_format(template_owner: Any) -> str:
    """"chat" when prompts go through the chat template, "plain" for a base model's text prompts."""
    return CHAT if has_template(template_owner) else PLAIN


def plain(question: str, system: str | None = None) -> str:
    """The text prompt of a base model: the system prompt and a blank line, then the question."""
    return f"{system}\n\n{question}" if system else question


PLAIN_ANSWER_SEPARATOR = "\n"  # a base model is trained to answer a plain prompt on the next line, then stop


def bos_text(tokenizer: Any) -> str:
    """The BOS token's text where the tokenizer adds one by itself (Gemma, Llama 3), else "": a plain prompt
    tokenized without special tokens must begin as the model always saw its input begin."""
    prefix = tokenizer("", add_special_tokens=True).input_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    return tokenizer.bos_token if bos is not None and prefix[:1] == [bos] else ""


def generation_prompt(template_owner: Any, question: str, *, image: bool = False, system: str | None = None,
                      typed: bool = False) -> str:
    """The generation prompt for one question: the chat template's, or a base model's plain text
    (:func:`plain`; an image needs a template to say where it goes, so a base model's image prompt is refused)."""
    if not has_template(template_owner):
        if image:
            raise ValueError("a model without a chat template has no place for an image in its prompt")
        return plain(question, system)
    return render(template_owner, messages(question, image=image, system=system, typed=typed))


def read_template(path: Path | str) -> str:
    """The text of a ``--chat-template FILE`` (a Jinja chat template), checked to parse."""
    import jinja2

    from edgemed.errors import DataError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--chat-template {path}: cannot read it ({e}); give a UTF-8 Jinja template file") from None
    if not text.strip():
        raise DataError(f"--chat-template {path}: the file is empty; give a Jinja chat template")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"--chat-template {path}: not a valid Jinja template (line {e.lineno}: {e.message})"
                        ) from None
    return text


def render(template_owner: Any, msgs: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render ``msgs`` with the chat template of a tokenizer or processor, as text (not token ids).

    A template that refuses a system turn beside an image (Llama-3.2-11B-Vision-Instruct's raises "Prompting with
    images is incompatible with system messages") gets the system text at the head of the first user turn instead,
    which is how Meta's model card has such instructions given; every other refusal is the template's own."""
    import jinja2

    try:
        return template_owner.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
    except jinja2.TemplateError:
        folded = fold_system(msgs)
        if folded is None:
            raise
        return template_owner.apply_chat_template(folded, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)


def fold_system(msgs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``msgs`` with a leading system turn moved into the first user turn's text, when a message holds an image;
    None when there is nothing to fold."""
    def has_image(m: dict[str, Any]) -> bool:
        return isinstance(m["content"], list) and any(part.get("type") == "image" for part in m["content"])

    if not msgs or msgs[0]["role"] != "system" or not any(has_image(m) for m in msgs):
        return None
    sys_content = msgs[0]["content"]
    system = sys_content if isinstance(sys_content, str) else "".join(
        part.get("text", "") for part in sys_content if part.get("type") == "text")
    rest = [dict(m) for m in msgs[1:]]
    user = next((m for m in rest if m["role"] == "user"), None)
    if user is None:
        return None
    if isinstance(user["content"], str):
        user["content"] = f"{system}\n\n{user['content']}"
    else:
        parts = [dict(part) for part in user["content"]]
        text = next((part for part in parts if part.get("type") == "text"), None)
        if text is None:
            parts.append({"type": "text", "text": system})
        else:
            text["text"] = f"{system}\n\n{text['text']}"
        user["content"] = parts
    return rest


def prompt_and_answer(template_owner: Any, question: str, answer: str, *, image: bool, system: str | None,
                      typed: bool) -> tuple[str, str]:
    """The generation prompt and the answer text that follows it, ending with the template's end of turn.

    Rendering the conversation with and without the answer and taking the difference keeps exactly the
    template's closing tokens (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``) in the supervised part.

    A base model (no chat template) gets its plain prompt, BOS in front where its tokenizer adds one (the caller
    tokenizes without special tokens, as a rendered template holds its own BOS), and the answer on the next line
    followed by EOS, so that the fine-tune learns to stop.
    """
    if not has_template(template_owner):
        tok = getattr(template_owner, "tokenizer", template_owner)
        return (bos_text(tok) + generation_prompt(template_owner, question, image=image, system=system),
                PLAIN_ANSWER_SEPARATOR + answer + (getattr(tok, "eos_token", None) or ""))
    prompt = render(template_owner, messages(question, image=image, system=system, typed=typed), True)
    full = render(template_owner, messages(question, image=image, system=system, typed=typed, answer=answer),
                  False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer turn")
    return prompt, full[len(prompt):].rstrip("\n")


def end_of_turn(template_owner: Any, tokenizer: Any, *, typed: bool) -> int | None:
    """The special token the chat template closes an answer with (``<|im_end|>``, ``<end_of_turn>``,
    ``<|eot_id|>``), or None for a base model or a template that closes answers with plain text.

    Read from the template itself (an answer turn rendered and the first special token after it), so no family's
    token is named here.
    """
    import jinja2

    if not has_template(template_owner):
        return None
    try:
        _, closed = prompt_and_answer(template_owner, "Hi", "Yes", image=False, system=None, typed=typed)
    except (ValueError, jinja2.TemplateError):  # a template that refuses this conversation: the other ids remain
        return None
    if "Yes" not in closed:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    closing = tokenizer(closed.split("Yes", 1)[1], add_special_tokens=False).input_ids
    return next((int(t) for t in closing if t in special), None)

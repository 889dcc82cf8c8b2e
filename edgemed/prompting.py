"""One prompt renderer for training, export checks, evaluation and serving: the model's own chat template.

Image models get typed content (``{"type": "image"}`` parts), which their processors' templates turn into the
family's image placeholder; text models get plain string content, as their templates expect.
"""

from __future__ import annotations

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


def render(template_owner: Any, msgs: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render ``msgs`` with the chat template of a tokenizer or processor, as text (not token ids)."""
    return template_owner.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)


def prompt_and_answer(template_owner: Any, question: str, answer: str, *, image: bool, system: str | None,
                      typed: bool) -> tuple[str, str]:
    """The generation prompt and the answer text that follows it, ending with the template's end of turn.

    Rendering the conversation with and without the answer and taking the difference keeps exactly the
    template's closing tokens (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``) in the supervised part.
    """
    prompt = render(template_owner, messages(question, image=image, system=system, typed=typed), True)
    full = render(template_owner, messages(question, image=image, system=system, typed=typed, answer=answer),
                  False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer turn")
    return prompt, full[len(prompt):].rstrip("\n")

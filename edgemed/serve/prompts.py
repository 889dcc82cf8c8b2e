"""A request made into what the model is given: the rendered prompt, its image and its decoding settings.

``/v1/chat/completions`` renders conversations with the model's chat template; ``/v1/completions`` continues a
plain text prompt, which is how a base model (no chat template) is used. Chat on a base model is refused with
a 400 that says so, unless ``--chat-template FILE`` gave it a template.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgemed import prompting
from edgemed.backends.base import GenParams
from edgemed.errors import EdgemedError
from edgemed.limits import LimitError, gen_params
from edgemed.serve.images import image_from_url
from edgemed.serve.schema import ApiError, ChatRequest, CompletionRequest, Part, read_request

if TYPE_CHECKING:
    from PIL import Image
    from starlette.requests import Request

    from edgemed.backends.base import Backend
    from edgemed.serve.config import ServeConfig


@dataclass
class Prompt:
    text: str
    image: Image.Image | None
    params: GenParams
    stream: bool
    include_usage: bool
    kind: str = "chat"  # "chat" (chat.completion objects) or "text" (text_completion objects)
    echo: str = ""  # a completion's prompt, sent before its answer when asked (echo)
    model: str | None = None  # the request's model field: picks an adapter when the server has them


async def parse(request: Request, kind: str, backend: Backend, config: ServeConfig) -> Prompt:
    """The request's prompt (a chat request, or a text completion for ``kind`` "text"), or a 4xx ApiError
    saying what is wrong with it."""
    if kind == "text":
        return build_completion(await read_request(request, CompletionRequest, config.max_body_bytes), config)
    req = await read_request(request, ChatRequest, config.max_body_bytes)
    has_image = any(isinstance(m.content, list) and any(p.type == "image_url" for p in m.content)
                    for m in req.messages)
    if not has_image:  # rendering text is quick: a hop to another thread would cost more than it saves
        return build_prompt(req, backend, config)
    # image decoding is CPU work: off the event loop
    return await asyncio.get_running_loop().run_in_executor(None, build_prompt, req, backend, config)


def _text_of(content: str | list[Part] | None, images: list[str]) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type == "text":
            if part.text is None:
                raise ApiError(400, "a text content part needs 'text'", "invalid_content")
            texts.append(part.text)
        else:
            if part.image_url is None:
                raise ApiError(400, "an image_url content part needs 'image_url': {'url': ...}", "invalid_content")
            images.append(part.image_url.url)
    return "\n".join(texts)


def build_prompt(req: ChatRequest, backend: Backend, config: ServeConfig) -> Prompt:
    """The rendered prompt, image and decoding settings of one request.

    One user message (and an optional system message) is rendered by ``backend.render``, exactly as a direct
    call renders it. A conversation with history is rendered with the model's own chat template, with the image
    in the user turn that carried it.
    """
    system_parts, turns, images = [], [], []  # turns: (role, text, carries the image)
    for m in req.messages:
        found: list[str] = []
        text = _text_of(m.content, found)
        if m.role in ("system", "developer"):
            if turns:
                raise ApiError(400, "a system message must come before the conversation", "invalid_conversation")
            system_parts.append(text)
        else:
            turns.append((m.role, text, bool(found)))
        if found and m.role != "user":
            raise ApiError(400, f"images belong in a user message, not a {m.role} message", "invalid_content")
        images += found
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's question", "invalid_conversation")
    if not prompting.has_template(backend.processor):
        raise ApiError(400, "this model has no chat template (a base model): send a plain text prompt to "
                       "/v1/completions, or restart the server with --chat-template FILE", "no_chat_template")
    if len(images) > 1:
        raise ApiError(400, f"one image per request is supported (got {len(images)})", "too_many_images")
    if images and not backend.is_vision:
        raise ApiError(400, "this model is a text model and takes no image; send text only", "image_not_supported")
    params = _params(req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p, req.seed, req.stop,
                     config)
    image = image_from_url(images[0], config, backend.arch.dicom_render) if images else None
    system = "\n".join(p for p in system_parts if p) or None
    try:
        if len(turns) == 1:
            text = backend.render(turns[0][1], image=image is not None, system=system)
        else:
            text = _render_history(backend, system, turns)
    except EdgemedError as e:
        raise ApiError(400, str(e), "invalid_prompt") from None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Prompt(text, image, params, req.stream, include_usage, model=req.model)


def build_completion(req: CompletionRequest, config: ServeConfig) -> Prompt:
    """The prompt and decoding settings of one text completion: the prompt text as given, no template."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, f"one prompt per request is supported (got {len(prompts)})", "too_many_prompts")
    if not prompts[0]:
        raise ApiError(400, "prompt is empty; send the text to continue", "invalid_prompt")
    params = _params(req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, config)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Prompt(prompts[0], None, params, req.stream, include_usage, kind="text",
                  echo=prompts[0] if req.echo else "", model=req.model)


def _params(max_tokens: int | None, temperature: float, top_p: float, seed: int | None,
            stop: str | list[str] | None, config: ServeConfig) -> GenParams:
    """Decoding settings through the limits every front end shares (edgemed.limits), or a 400."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    try:
        return gen_params(max_tokens or config.max_tokens_cap, temperature, top_p, seed, stops,
                          cap=config.max_tokens_cap)
    except LimitError as e:
        raise ApiError(400, str(e), e.code) from None


def _render_history(backend: Backend, system: str | None, turns: list[tuple[str, str, bool]]) -> str:
    """A whole conversation through the chat template of the processor or tokenizer the backend renders with."""
    owner = backend.processor
    if owner is None or not hasattr(owner, "apply_chat_template"):
        raise ApiError(400, f"the {backend.name} runtime answers single questions only; send an optional system "
                       "message and one user message", "unsupported_conversation")
    typed = backend.is_vision  # image models' templates take typed content, text models' plain strings

    def content(text: str, image: bool = False) -> Any:
        return ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}] if typed else text

    msgs = [{"role": "system", "content": content(system)}] if system else []
    msgs += [{"role": role, "content": content(text, image)} for role, text, image in turns]
    try:
        return prompting.render(owner, msgs)
    except Exception as e:  # the template's own refusal (e.g. roles must alternate), from jinja
        raise ApiError(400, f"the model's chat template refused this conversation: {e}", "invalid_conversation"
                       ) from None

"""Generations: the backend runs in a worker thread per slot, and its chunks reach the event loop as a whole
answer or as server-sent events, OpenAI-shaped either way.

``backend.stream`` yields ``edgemed.backends.base.Chunk(text, tokens, finish_reason)``; the last chunk carries
the finish reason and the token count, so usage comes from the stream and nothing is re-tokenized afterwards.
A client that disconnects, a timeout or a server shutting down stops its generation within one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgemed.errors import EdgemedError
from edgemed.serve.schema import ApiError

if TYPE_CHECKING:
    from starlette.requests import Request

    from edgemed.serve.admission import Gate, Ticket
    from edgemed.serve.metrics import Metrics
    from edgemed.serve.models import Models
    from edgemed.serve.prompts import Prompt

log = logging.getLogger("edgemed.serve")


def finish_reason(reason: str) -> str:
    """The OpenAI finish reason of a backend's: "length" at max_tokens, "stop" otherwise (EOS, a stop string,
    or a generation stopped early)."""
    return reason if reason in ("stop", "length") else "stop"


@dataclass
class Job:
    """One admitted request: what to generate, the slot it holds, and its clock."""

    prompt: Prompt
    ticket: Ticket
    arrived: float
    deadline: float
    model: str  # the model id the answer names
    adapter: str | None = None  # the LoRA adapter answering (None: the base)


class Worker:
    """Runs generations on the model instances, one thread per slot, and hands their pieces to the event loop."""

    def __init__(self, models: Models, gate: Gate, metrics: Metrics, timeout: float):
        self.models, self.gate, self.metrics, self.timeout = models, gate, metrics, timeout
        self.fingerprint = f"edgemed-{models.base.name}"
        self.closing = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=models.slots, thread_name_prefix="edgemed-serve")

    def shutdown(self) -> None:
        """Running generations stop within one token instead of finishing their answers."""
        self.closing.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ the bridge
    async def run(self, job: Job) -> AsyncIterator[tuple[str, Any]]:
        """Run the backend in the pool; yield ("piece", text) ... then ("end", (finish_reason, usage, text)).

        Pieces are posted to the event loop only for a streamed answer: a whole answer wakes the loop once, which
        keeps the server's cost per token near nothing.

        The worker thread gives the slot back when the backend has really finished, so a cancelled request never
        lets a second generation start while the first still holds the model. Leaving early (timeout, disconnect,
        cancellation) tells the worker to stop, which closes the backend's generator: the model stops within one
        token. Raises TimeoutError past the deadline.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def post(item: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(q.put_nowait, item)

        def work() -> None:
            backend = self.models.take()
            try:
                post(("end", self._generate(self.models.answering(backend, job.adapter), job.prompt, stop, post)))
            except BaseException as e:  # handed to the request, which answers 500
                post(("error", e))
            finally:
                self.models.give(backend)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.gate.leave)

        job.ticket.hand_over()
        try:
            loop.run_in_executor(self.pool, work)
        except RuntimeError:  # the pool is shut down
            self.gate.leave()
            raise
        try:
            while True:
                remaining = job.deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                kind, value = await asyncio.wait_for(q.get(), remaining)
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "end":
                    return
        finally:
            stop.set()

    def _generate(self, backend, prompt: Prompt, stop: threading.Event, post) -> tuple[str, dict[str, int], str]:
        """One generation in the worker thread that holds ``backend``: (finish reason, usage, text)."""
        t0 = time.perf_counter()
        reason, pieces, n_tokens = "cancelled", [], 0
        it = backend.stream(prompt.text, prompt.image, prompt.params)
        try:
            for chunk in it:
                n_tokens = chunk.tokens
                if chunk.text:
                    pieces.append(chunk.text)
                    if prompt.stream:
                        post(("piece", chunk.text))
                if chunk.finish_reason is not None:
                    reason = chunk.finish_reason
                    break
                if stop.is_set() or self.closing.is_set():
                    break
        finally:
            it.close()
        # counted here, in the thread that owns the backend, not beside another generation
        usage = {"prompt_tokens": len(backend.tokenize(prompt.text)), "completion_tokens": n_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.metrics.generated(n_tokens, time.perf_counter() - t0)
        return reason, usage, "".join(pieces)

    # ------------------------------------------------------------------ answers
    async def whole(self, job: Job) -> dict[str, Any]:
        """A whole (non-streamed) answer, once a slot is held."""
        text, reason, usage = "", "stop", {}
        try:
            async with contextlib.aclosing(self.run(job)) as gen:
                async for kind, value in gen:
                    if kind == "end":
                        reason, usage, text = value
        except TimeoutError:
            raise ApiError(504, f"the answer took longer than {self.timeout:g} s; ask for fewer tokens or try "
                           "again later", "timeout") from None
        except EdgemedError as e:
            raise ApiError(400, str(e), "invalid_request") from None
        except Exception as e:
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", "generation_failed") from None
        self.metrics.ended("completed", job.arrived)
        text_kind = job.prompt.kind == "text"
        body: dict[str, Any] = {"id": f"{'cmpl' if text_kind else 'chatcmpl'}-{uuid.uuid4().hex}",
                                "object": "text_completion" if text_kind else "chat.completion",
                                "created": int(time.time()), "model": job.model,
                                "system_fingerprint": self.fingerprint}
        if text_kind:
            choice = {"index": 0, "text": job.prompt.echo + text, "logprobs": None}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        return {**body, "choices": [{**choice, "finish_reason": finish_reason(reason)}], "usage": usage}

    async def events(self, job: Job, request: Request) -> AsyncIterator[str]:
        """Server-sent events of one answer; a disconnect (polled between pieces, or seen by Starlette) stops it.
        The outcome is counted once, however the stream ends (cancelled, unless it reaches its end or fails)."""
        sse = _Events(job)
        outcome = "cancelled"
        last_check = time.monotonic()
        try:
            for event in sse.opening():
                yield event
            # aclosing: however this generator ends, the inner one's cleanup (stop the model) runs at once
            async with contextlib.aclosing(self.run(job)) as gen:
                async for kind, value in gen:
                    if kind == "end":
                        for event in sse.ending(*value[:2]):
                            yield event
                        break
                    yield sse.piece(value)
                    if time.monotonic() - last_check > 0.1:  # a cheap poll, at most ten times a second
                        last_check = time.monotonic()
                        if await request.is_disconnected():
                            return
            yield "data: [DONE]\n\n"
            outcome = "completed"
        except TimeoutError:
            outcome = "timed_out"
            yield sse.error(ApiError(504, f"the answer took longer than {self.timeout:g} s", "timeout"))
        except Exception as e:
            log.exception("generation failed")
            outcome = "server_errors"
            yield sse.error(ApiError(500, f"generation failed: {type(e).__name__}: {e}", "generation_failed"))
        finally:
            self.metrics.ended(outcome, job.arrived)


class _Events:
    """The server-sent events of one answer: chat.completion.chunk objects, or text_completion ones."""

    def __init__(self, job: Job):
        self.job, self.text = job, job.prompt.kind == "text"
        self.rid = f"{'cmpl' if self.text else 'chatcmpl'}-{uuid.uuid4().hex}"

    def opening(self) -> list[str]:
        """The first events: the assistant's role (chat), or the echoed prompt (text, when asked)."""
        if not self.text:
            return [self._chunk({"role": "assistant", "content": ""}, None)]
        return [self._chunk({"content": self.job.prompt.echo}, None)] if self.job.prompt.echo else []

    def piece(self, text: str) -> str:
        return self._chunk({"content": text}, None)

    def ending(self, reason: str, usage: dict[str, int]) -> list[str]:
        """The finish reason, then the usage when the request asked for it (stream_options.include_usage)."""
        events = [self._chunk({}, finish_reason(reason))]
        if self.job.prompt.include_usage:
            events.append(f"data: {json.dumps({**self._head(), 'choices': [], 'usage': usage})}\n\n")
        return events

    @staticmethod
    def error(e: ApiError) -> str:
        return f"data: {json.dumps(e.body())}\n\n"

    def _head(self) -> dict[str, Any]:
        return {"id": self.rid, "object": "text_completion" if self.text else "chat.completion.chunk",
                "created": int(time.time()), "model": self.job.model}

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> str:
        if self.text:  # a text_completion chunk carries the piece as "text"
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps({**self._head(), 'choices': [choice]}, ensure_ascii=False)}\n\n"

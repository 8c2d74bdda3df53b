"""The OpenAI-compatible app of `python -m avllm_jax.serve` (avllm_jax/serve.py): the loaded
model and its engine shared by every request, and POST /v1/chat/completions with its errors. The
command imports it once its flags and files are checked: fastapi is an optional dependency (the
`serve` extra)."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import tempfile
import time
import uuid

import jax
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from avllm_jax.data import conversation, samples
from avllm_jax.data.media import MediaError
from avllm_jax.inference import batching, prompts
from avllm_jax.inference.chat_requests import ChatRequest, MediaSource, RequestError, parse_request


class Service:
    """The model, its engine and the server's limits, shared by every request."""

    def __init__(self, model, tokenizer, data_config, args: argparse.Namespace):
        self.model, self.tokenizer, self.data_config, self.args = model, tokenizer, data_config, args
        self.name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
        self.engine = batching.Engine(model, max_batch=args.max_batch, max_length=args.max_length)
        self.media = MediaSource(args.media_root, args.allow_http)
        self.workers = concurrent.futures.ThreadPoolExecutor(args.media_workers, thread_name_prefix="avllm-media")
        self.held = 0  # requests in the server, decoding or waiting (read and written on the event loop only)

    def release(self) -> None:
        self.held -= 1

    @property
    def capacity(self) -> int:
        return self.args.max_batch + self.args.max_queue

    def prepare(self, chat: ChatRequest) -> batching.Request:
        """The request's media decoded and its prompt built (in a worker thread); RequestError,
        MediaError or ValueError for what cannot be answered."""
        with tempfile.TemporaryDirectory(prefix="avllm-serve-") as scratch:
            path = self.media.resolve(chat.media_part, chat.media_field, scratch)
            try:
                media = samples.load_limited_media(path, self.data_config, self.args.max_duration_s)
            except MediaError as error:
                raise RequestError(f"{chat.media_field}: {error}") from None
        name = f"the media of {chat.media_field}"
        modality = prompts.resolve_modality(media, chat.modality, name)
        if (part := prompts.missing_part(self.model, modality)) is not None:
            raise RequestError(f"modality {modality.value!r} needs a {part}, which this model lacks")
        (role, question), *rest = chat.turns
        turns = [(role, conversation.first_user_message(question, modality)), *rest]
        batch = prompts.conversation_batch(self.model, self.tokenizer, [media], [turns], [modality], self.data_config)
        job = batching.Request(
            batch=batch,
            max_new_tokens=chat.max_new_tokens,
            eos_ids=() if chat.ignore_eos else (self.tokenizer.eos_token_id,),
            emit=lambda token, reason: None,  # set by the handler
            temperature=chat.temperature,
            top_p=chat.top_p,
            key=jax.random.split(jax.random.key(chat.seed))[1],  # the chat command's turn key
        )
        self.engine.check_fits(job)
        return job


class _Answer:
    """The text of a growing answer, cut at the first stop string. `add` returns the text to
    send now: like the chat command's printer it holds back what may still change (trailing
    whitespace, an unfinished character, what could start a stop string)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.shown = tokenizer, stop, ""
        self.tokens: list[int] = []
        self.stopped, self.text = False, ""

    def _text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self._text().rstrip().rstrip("\ufffd")
        if self.stop and not self.stopped:
            text = text[: max(0, len(text) - max(map(len, self.stop)) + 1)]
        return self._extend(text)

    def final(self) -> str:
        self.text = self._text().strip()
        return self._extend(self.text)

    def _extend(self, text: str) -> str:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            delta, self.shown = text[len(self.shown) :], text
            return delta
        return ""


def _error(status: int, message: str, **headers) -> JSONResponse:
    kind = "invalid_request_error" if status == 400 else "server_error" if status >= 500 else "rate_limit_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="avllm_jax", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health():
        engine = service.engine
        return {
            "status": "ok",
            "model": service.name,
            "active": engine.active,
            "waiting": service.held - engine.active,
            "max_batch": service.args.max_batch,
            "max_queue": service.args.max_queue,
            "finished": dict(engine.finished),
            "prefills": dict(engine.prefills),
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0, "owned_by": "avllm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            chat = parse_request(await request.json(), service.name, service.args.max_new_tokens)
        except json.JSONDecodeError as error:
            return _error(400, f"the request body is not JSON: {error}")
        except RequestError as error:
            return _error(400, str(error))
        if service.held >= service.capacity:
            return _error(429, f"the server holds {service.held} requests, its limit", **{"Retry-After": "1"})
        service.held += 1
        return await _answer(service, request, chat)

    return app


async def _answer(service: Service, request: Request, chat: ChatRequest):
    """Runs one request. Its place in the server is released when the engine is done with it
    (answered, cancelled or failed: the engine's last emit), or here if it never got there."""
    loop = asyncio.get_running_loop()
    try:
        job = await loop.run_in_executor(service.workers, service.prepare, chat)
    except (RequestError, MediaError, ValueError) as error:
        service.held -= 1
        return _error(400, str(error))
    except BaseException:
        service.held -= 1
        raise
    events: asyncio.Queue = asyncio.Queue()

    def emit(token: int | None, reason: str | None) -> None:  # called from the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, (token, reason))
        if reason is not None:
            loop.call_soon_threadsafe(service.release)

    job.emit = emit
    try:
        service.engine.submit(job)
    except ValueError as error:
        service.held -= 1
        return _error(400, str(error))
    answer, created, ident = _Answer(service.tokenizer, chat.stop), int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

    async def next_delta() -> tuple[str, str | None]:
        """The next text to send and the finish reason (None while the answer goes on)."""
        token, reason = await events.get()
        if reason is not None and reason.startswith("error"):
            raise RuntimeError(reason)
        delta = answer.add(token) if token is not None else ""
        if answer.stopped:
            job.cancel()
            reason = "stop"
        return (delta + answer.final() if reason else delta), reason

    def usage() -> dict:
        completion = len(answer.tokens)
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion,
        }

    def chunk(delta: dict, reason: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": service.name}
        return f"data: {json.dumps(body | {'choices': [choice]} | extra)}\n\n"

    # The first event comes before any response is sent, so a failed prefill is an HTTP error
    # and a client that leaves while it waits frees its place.
    waiter = asyncio.ensure_future(_disconnected(request))
    first = asyncio.ensure_future(next_delta())
    await asyncio.wait({waiter, first}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        job.cancel()
        first.cancel()
        return _error(499, "the client closed the connection")
    try:
        delta, reason = first.result()
    except RuntimeError as error:
        waiter.cancel()
        return _error(500, str(error))

    if chat.stream:
        waiter.cancel()  # the streaming response watches for the client leaving itself

        async def events_stream():
            try:
                yield chunk({"role": "assistant", "content": delta})
                finish = reason
                while finish is None:
                    text, finish = await next_delta()
                    if text:
                        yield chunk({"content": text})
                yield chunk({}, finish)
                if chat.include_usage:
                    body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": service.name}
                    yield f"data: {json.dumps(body | {'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a no-op for a finished answer; frees the row of a client that left

        return StreamingResponse(events_stream(), media_type="text/event-stream")

    async def rest() -> str | None:
        finish = reason
        while finish is None:
            _, finish = await next_delta()
        return finish

    finishing = asyncio.ensure_future(rest())
    try:
        await asyncio.wait({waiter, finishing}, return_when=asyncio.FIRST_COMPLETED)
        if not finishing.done():
            job.cancel()
            finishing.cancel()
            return _error(499, "the client closed the connection")
        finish = finishing.result()
    except RuntimeError as error:
        return _error(500, str(error))
    finally:
        waiter.cancel()
    message = {"role": "assistant", "content": answer.text}
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": service.name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage(),
    }

"""The HTTP side of ``medusa serve``: the OpenAI API subset over FastAPI, in front of an ``Engine``.

Handlers validate and check limits before the model is involved, so that a bad request is answered
at once; chat templating and tokenization run on a thread of their own (a long prompt must not stall
the event loop, hence ``/health``), after a cheap bound on the prompt's length. The generation runs
on the engine's worker thread and its events come back through an asyncio queue. Every error,
FastAPI's own included, is answered in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` so clients show the message; bodies never carry exception text, and every response has
an ``x-request-id`` that the server's log line about it carries too.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medusa.errors import MedusaError
from medusa.model import GenerationChunk, GenerationConfig
from medusa.serve.engine import Engine, EngineStopped, Failed, Finished, Job, PromptScored, QueueFull
from medusa.serve.logprobs import TokenScores, TokenTable
from medusa.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
)

try:  # chat templates need jinja2; a server without it still serves /v1/completions
    from jinja2.exceptions import TemplateError
except ImportError:  # pragma: no cover
    TemplateError = type("TemplateError", (Exception,), {})

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
# How often a handler waiting on a non-streamed generation looks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.25
# How often a handler waiting on the engine looks whether its worker is still alive.
WORKER_POLL_SECONDS = 1.0
# Deeper JSON than this is refused (OpenAI requests nest a few levels; Python's parser gives up near 1000).
MAX_JSON_DEPTH = 64
# The most choices (``n``) one request may ask for, whatever the server's line holds.
MAX_CHOICES = 128
# Stand-ins for message contents while the chat template is rendered, to find where each content lies.
PLACEHOLDER = "\ue000{}\ue001"
PLACEHOLDER_PATTERN = re.compile("\ue000(\\d+)\ue001")


@dataclass
class ServeSettings:
    model_name: str | None = None  # the id clients send as "model" (default: the model's own name)
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <api_key>"
    max_tokens_cap: int = 4096  # the most tokens one request may ask for
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0  # seconds a client has to send the request body, once the headers are in
    special_tokens_in_content: bool = False  # True: "<|im_start|>" in a message acts as a control token
    acceptance: str = "auto"  # greedy at temperature 0, lossless rejection sampling above (see GenerationConfig)

    def __post_init__(self) -> None:
        if self.max_tokens_cap < 1:
            raise MedusaError(f"max_tokens_cap must be a positive integer, got {self.max_tokens_cap}")
        if not self.body_timeout > 0:
            raise MedusaError(f"body_timeout must be a positive number of seconds, got {self.body_timeout}")
        GenerationConfig(acceptance=self.acceptance)  # refuses an unknown scheme now


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers
        self.detail = detail  # for the log line only, never the client

    def response(self, request: Request | None = None) -> JSONResponse:
        """The answer; logs one line with the request id the response carries in ``x-request-id``."""
        if request is not None:
            log.info(
                "request %s: %s %s refused with %d (%s): %s%s",
                request_id(request.scope),
                request.method,
                request.url.path,
                self.status,
                self.code or self.type,
                self.message,
                f" ({self.detail})" if self.detail else "",
            )
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def request_id(scope: Scope) -> str:
    return scope.get("state", {}).get("request_id", "-")


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app; it starts the engine's worker on startup and stops it on shutdown."""
    settings = settings or ServeSettings()
    server = _Server(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)
            server.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Medusa", description="OpenAI-compatible API over Medusa decoding", lifespan=lifespan)
    app.state.medusa = server
    app.add_middleware(_RequestGuard, server=server)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error.errors()).response(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return ApiError(error.status_code, message, code=code, headers=getattr(error, "headers", None)).response(
            request
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        server.authorize(request)
        chat = server.parse(ChatCompletionRequest, await _read_json(request, settings))
        server.check_prompt_chars(sum(len(m.content) for m in chat.messages), "messages")
        prompt_ids = await server.off_the_loop(server.encode_chat, chat)
        return await server.complete(request, chat, prompt_ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        server.authorize(request)
        completion = server.parse(CompletionRequest, await _read_json(request, settings))
        if isinstance(completion.prompt, str):
            server.check_prompt_chars(len(completion.prompt), "prompt")
        prompt_ids = await server.off_the_loop(server.encode_text, completion)
        echo = await server.off_the_loop(server.prompt_text, completion) if completion.echo else None
        return await server.complete(request, completion, prompt_ids, chat=False, echo=echo)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        server.authorize(request)
        return ModelList(data=[server.card])

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> ModelCard:
        server.authorize(request)
        server.check_model(model_id, param=None)
        return server.card

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive and not server.closing
        body = {
            "status": "ok" if ok else ("stopping" if server.closing else "stopped"),
            "model": server.model_name,
            "waiting": engine.waiting,
            "running": engine.running,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = engine.metrics.render(waiting=engine.waiting, running=engine.running)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class _Server:
    """What the handlers share: the engine, the settings, and a tokenizer of their own."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings
        model = engine.model
        self.model_name = settings.model_name or model.name.rstrip("/").rsplit("/", 1)[-1] or "medusa"
        self.card = ModelCard(id=self.model_name, created=int(time.time()))
        # The worker decodes with the model's tokenizer; a copy keeps the two threads from sharing one.
        self.tokenizer = copy.deepcopy(model.tokenizer)
        self.vocab_size = model.base_model.get_input_embeddings().weight.shape[0]
        self.context_length = model.context_length
        # One thread templates and tokenizes, in turn (a fast tokenizer must not be used by two at once).
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medusa-tokenize")
        self.max_prompt_chars = _max_prompt_chars(self.tokenizer, self.context_length)
        self.special_ids = _special_ids(self.tokenizer)
        self.closing = False  # set on shutdown: new requests get 503
        self._token_table: TokenTable | None = None  # built when log-probabilities are first asked for
        self.max_choices = min(MAX_CHOICES, engine.capacity)

    async def off_the_loop(self, work: Callable[[Any], Any], request: SamplingRequest) -> Any:
        """``work(request)`` on the tokenizing thread (templating, tokenizing, decoding)."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, work, request)

    async def drain(self, grace: float) -> None:
        """Shutdown: refuse new requests, give the generations under way ``grace`` seconds, then end them
        (their clients get a 503 or a final error event)."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self.engine.running or self.engine.waiting) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        ended = self.engine.running + self.engine.waiting
        await loop.run_in_executor(None, self.engine.stop)
        log.info("shut down: %d generation(s) ended after the %gs grace period", ended, grace)

    # ----- checks -------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        expected = self.settings.api_key
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            message = "no API key given: send it in the header 'Authorization: Bearer <key>'"
        elif scheme.lower() != "bearer" or not token.strip():
            message = "the Authorization header must read 'Bearer <key>'"
        elif secrets.compare_digest(token.strip().encode(), expected.encode()):
            return
        else:
            message = "incorrect API key provided"
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def parse(self, model: type[SamplingRequest], body: dict) -> Any:
        try:
            request = model.model_validate(body)
        except ValidationError as error:
            raise _validation_error(error.errors(), in_body=False) from None
        self.check_model(request.model, param="model")
        problem = request.invalid()
        if problem is not None:
            raise ApiError(400, problem[1], param=problem[0], code="invalid_value")
        problem = request.unsupported()
        if problem is not None:
            raise ApiError(400, problem[1], param=problem[0], code="unsupported_parameter")
        if request.n > self.max_choices:
            why = (
                f"its batch of {self.engine.config.max_batch} plus {self.engine.config.max_waiting} waiting"
                if self.max_choices == self.engine.capacity
                else "the most one request may ask for"
            )
            raise ApiError(
                400,
                f"n is {request.n}, over this server's limit of {self.max_choices} choices per request ({why})",
                param="n",
                code="invalid_value",
            )
        return request

    def check_model(self, name: str, param: str | None) -> None:
        if name != self.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param=param,
                code="model_not_found",
            )

    # ----- prompts ------------------------------------------------------------------------------

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """A bound checked before tokenizing: no token is longer than the vocabulary's longest, so a
        prompt of more characters than the context holds of those cannot fit."""
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise ApiError(
                400,
                f"the prompt has {chars} characters, more than the model's context length of "
                f"{self.context_length} tokens can hold (at most {self.max_prompt_chars})",
                param=param,
                code="context_length_exceeded",
            )

    def encode_chat(self, request: ChatCompletionRequest) -> list[int]:
        """The messages through the chat template, as token ids. Unless the server trusts its clients
        (``special_tokens_in_content``), text such as ``<|im_start|>`` inside a message is plain text:
        only the template's own special tokens are control tokens."""
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        # "developer" is OpenAI's new name for "system"; chat templates know only the old one.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in request.messages
        ]
        text = self.render(messages)
        if self.settings.special_tokens_in_content or not self.special_ids:
            return self.check_ids(tokenizer(text, add_special_tokens=False)["input_ids"], "messages")
        stand_ins = [dict(m, content=PLACEHOLDER.format(index)) for index, m in enumerate(messages)]
        template, contents = self.render(stand_ins), [m["content"] for m in messages]
        spans, rebuilt, at = [], [], 0
        for match in PLACEHOLDER_PATTERN.finditer(template):  # where each content lies in the rendered text
            rebuilt.append(template[at : match.start()])
            start = sum(map(len, rebuilt))
            rebuilt.append(contents[int(match.group(1))])
            spans.append((start, start + len(rebuilt[-1])))
            at = match.end()
        rebuilt.append(template[at:])
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        injected = [
            i
            for i, token in enumerate(ids)
            if token in self.special_ids and any(start < offsets[i][1] and offsets[i][0] < end for start, end in spans)
        ]
        if not injected:
            return self.check_ids(ids, "messages")
        if "".join(rebuilt) != text:  # the template changes contents: where they lie is unknown
            raise ApiError(
                400,
                "a message contains special-token text (such as "
                f"{tokenizer.decode([ids[injected[0]]])!r}), which this model's chat template does not "
                "let the server tokenize as plain text",
                param="messages",
                code="special_tokens_in_content",
            )
        # Added tokens split the text before the tokenizer's own rules apply, so tokenizing the text
        # between the template's special tokens alone gives the same tokens, but for the injected ones.
        pieces, at = [], 0
        for i, token in enumerate(ids):
            if token in self.special_ids and i not in injected:
                pieces += self.plain_ids(text[at : offsets[i][0]]) + [token]
                at = offsets[i][1]
        return self.check_ids(pieces + self.plain_ids(text[at:]), "messages")

    def render(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001  (a template may raise anything; the client gets a 400)
            if type(error) is TemplateError:  # the template's own raise_exception (e.g. "roles must alternate")
                raise ApiError(
                    400, f"the model's chat template refused these messages: {error}", param="messages"
                ) from None
            raise ApiError(
                400,
                "the model's chat template could not render these messages",
                param="messages",
                detail=f"{type(error).__name__}: {error}",
            ) from None

    def plain_ids(self, text: str) -> list[int]:
        """``text``'s tokens with special-token text in it read as plain text."""
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_text(self, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, list):
            return self.check_ids(request.prompt, "prompt")
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        return self.check_ids(self.tokenizer(request.prompt)["input_ids"], "prompt")

    def prompt_text(self, request: CompletionRequest) -> str:
        """The prompt as text, for ``echo``: as sent, or its token ids decoded."""
        if isinstance(request.prompt, str):
            return request.prompt
        return self.tokenizer.decode(request.prompt) if self.tokenizer is not None else ""

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ApiError(
                400, f"prompt token ids must lie in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}", param=param
            )
        return ids

    def max_new_tokens(self, requested: int | None, prompt_len: int, prompt_param: str, limit_param: str) -> int:
        """The request's token budget, or a 400 naming the limit it breaks."""
        cap, context = self.settings.max_tokens_cap, self.context_length
        if requested is not None and requested > cap:
            raise ApiError(
                400,
                f"{limit_param} is {requested}, over this server's limit of {cap} tokens per request",
                param=limit_param,
                code="max_tokens_too_large",
            )
        if context is None:
            return requested or cap
        if prompt_len >= context:
            raise ApiError(
                400,
                f"the prompt has {prompt_len} tokens, over the model's context length of {context} tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        room = context - prompt_len
        if requested is None:
            return min(cap, room)
        if requested > room:
            raise ApiError(
                400,
                f"the model's context length is {context} tokens: the prompt has {prompt_len} and "
                f"{limit_param} asks for {requested} more; ask for at most {room}",
                param=limit_param,
                code="context_length_exceeded",
            )
        return requested

    def generation_config(
        self, request: SamplingRequest, max_new_tokens: int, choice: int = 0, logprobs: int | None = None
    ) -> GenerationConfig:
        """Choice ``choice``'s settings as a ``GenerationConfig``; unset sampling fields keep its defaults
        (greedy). With a seed, choice i samples with seed + i, so each choice is the single request of that seed."""
        options: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            stop=request.stop,
            chat_template=False,
            acceptance=self.settings.acceptance,
            logprobs=logprobs,
        )
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.top_p is not None:
            options["top_p"] = request.top_p
        if request.top_k is not None:
            options["top_k"] = max(request.top_k, 0)  # -1 (vLLM's "off") is 0 here
        if request.seed is not None:
            options["seed"] = (request.seed + choice) % 2**63  # OpenAI takes any 64-bit integer
        try:
            return GenerationConfig(**options)
        except MedusaError as error:
            raise ApiError(400, str(error)) from None

    # ----- generation ---------------------------------------------------------------------------

    async def complete(
        self, request: Request, body: SamplingRequest, prompt_ids: list[int], chat: bool, echo: str | None = None
    ) -> Any:
        """Run the request's ``n`` choices as jobs of the running batch; answer whole or as a stream.

        ``echo`` (completions) is the prompt's text, put before each choice's text; with log-probabilities
        asked for, the prompt's tokens are scored too (once, by the first choice's job).
        """
        prompt_param = "messages" if chat else "prompt"
        limit_param = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        if body.token_limit == 0:  # echo alone: the prompt must fit the context, nothing more
            max_new_tokens = 0
            if self.context_length is not None and len(prompt_ids) > self.context_length:
                raise ApiError(
                    400,
                    f"the prompt has {len(prompt_ids)} tokens, over the model's context length of "
                    f"{self.context_length} tokens",
                    param=prompt_param,
                    code="context_length_exceeded",
                )
        else:
            max_new_tokens = self.max_new_tokens(body.token_limit, len(prompt_ids), prompt_param, limit_param)
        asked = body.logprobs_asked
        score_prompt = echo is not None and asked is not None
        configs: list[GenerationConfig | None] = []
        if max_new_tokens:
            configs = [self.generation_config(body, max_new_tokens, choice, asked) for choice in range(body.n)]
        elif score_prompt:
            configs = [None]  # one job scores the prompt and generates nothing; every choice shows its scores
        table = await self.token_table() if asked is not None else None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink_for(index: int) -> Callable[[Any], None]:
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))

        if self.closing:
            raise ApiError(503, "the server is shutting down", type="server_error", code="unavailable")
        try:
            jobs = (
                self.engine.submit_all(
                    prompt_ids, configs, [sink_for(i) for i in range(len(configs))], asked if score_prompt else None
                )
                if configs
                else []
            )
        except QueueFull as error:
            raise ApiError(
                429,
                f"the server is busy: {error}; retry later",
                type="rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": str(error.retry_after)},
            ) from None
        except EngineStopped as error:
            raise ApiError(503, str(error), type="server_error", code="unavailable") from None
        reply = _Reply(
            chat=chat,
            model=self.model_name,
            prompt_ids=prompt_ids,
            n=body.n,
            table=table,
            asked=asked,
            echo=echo,
            generates=max_new_tokens > 0,
        )
        reply_id = request_id(request.scope)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                self.stream(jobs, events, reply, include_usage, reply_id),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(self.watch_disconnect(request, jobs))
        try:
            pending = len(jobs)
            while pending:
                index, event = await self.next_event(jobs, events)
                if isinstance(event, Failed):
                    raise _failure(event, reply_id)
                pending -= reply.absorb(index, event) is not None
            return reply.whole()
        finally:
            watcher.cancel()
            for job in jobs:
                self.engine.cancel(job)  # a no-op when it has finished

    async def token_table(self) -> TokenTable:
        """The vocabulary's token strings, built once on the tokenizing thread."""
        if self._token_table is None:
            if self.tokenizer is None:
                raise ApiError(
                    400,
                    "this model has no tokenizer, which log-probabilities need to name the tokens",
                    param="logprobs",
                )
            table = await asyncio.get_running_loop().run_in_executor(
                self.tokenizing, TokenTable, self.tokenizer, self.vocab_size
            )
            self._token_table = table
        return self._token_table

    async def watch_disconnect(self, request: Request, jobs: list[Job]) -> None:
        """Cancel a non-streamed request's jobs when its client has gone (streams learn it from Starlette)."""
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        for job in jobs:
            self.engine.cancel(job)

    async def next_event(self, jobs: list[Job], events: asyncio.Queue) -> tuple[int, Any]:
        """The next ``(choice index, event)``; a timeout once the deadline has passed, a failure if the worker died."""
        deadline = min(job.deadline for job in jobs)
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(events.get(), timeout=min(max(remaining, 0.0), WORKER_POLL_SECONDS))
            except TimeoutError:
                if remaining <= WORKER_POLL_SECONDS:
                    return 0, Failed("timeout", self.engine.timeout_message())
                if not self.engine.alive and events.empty():
                    return 0, Failed("shutdown", "the server's engine has stopped")

    async def stream(
        self, jobs: list[Job], events: asyncio.Queue, reply: _Reply, include_usage: bool, reply_id: str
    ) -> AsyncIterator[str]:
        """Server-sent events, the choices' chunks interleaved as they come, each with its index. Starlette
        cancels this generator when the client disconnects; the ``finally`` then cancels the jobs, which
        frees their rows after the current step."""
        done = False
        try:
            if reply.chat:
                for index in range(reply.n):
                    yield _sse(reply.chunk(index, role=True))
            elif reply.echo is not None and not (jobs and jobs[0].prompt_logprobs is not None):
                for index in range(reply.n):  # the echo goes first (with scores, once the prompt is scored)
                    yield _sse(reply.echo_chunk(index))
            pending = len(jobs)
            while pending:
                index, event = await self.next_event(jobs, events)
                if isinstance(event, Failed):
                    error = _failure(event, reply_id)
                    log.info(
                        "request %s: stream ended with %d (%s): %s",
                        reply_id,
                        error.status,
                        error.code or error.type,
                        error.message,
                    )
                    yield _sse(
                        {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}
                    )
                    break
                if isinstance(event, PromptScored):
                    reply.absorb(index, event)
                    for choice in range(reply.n):
                        yield _sse(reply.echo_chunk(choice))
                elif isinstance(event, GenerationChunk):
                    if event.text or (reply.asked is not None and event.token_ids):
                        yield _sse(reply.delta_chunk(index, event))
                elif isinstance(event, Finished):
                    reply.absorb(index, event)
                    pending -= 1
                    if reply.generates:
                        yield _sse(reply.chunk(index, finish_reason=event.finish_reason))
            else:
                done = True
                if not reply.generates:  # max_tokens 0: every choice ends with its echo
                    for index in range(reply.n):
                        yield _sse(reply.chunk(index, finish_reason="length"))
                if include_usage:
                    yield _sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                for job in jobs:
                    self.engine.cancel(job)


@dataclass
class _Choice:
    texts: list[str] = field(default_factory=list)
    scores: TokenScores = field(default_factory=TokenScores)
    offset: int = 0  # characters streamed so far, echo included (the completions API's text_offset)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class _Reply:
    """Builds one request's response bodies, whole or as stream chunks, from its choices' events."""

    chat: bool
    model: str
    prompt_ids: list[int]
    n: int = 1
    table: TokenTable | None = None  # set when log-probabilities are asked for
    asked: int | None = None  # alternatives per token, None: no log-probabilities
    echo: str | None = None  # the prompt's text, put before each completion
    generates: bool = True  # False: max_tokens 0, the prompt is only echoed (and scored)

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(self.n)]
        self.prompt_scores: TokenScores | None = None

    def absorb(self, index: int, event: Any) -> Finished | None:
        """Record a choice's event; returns it when it ends the choice."""
        choice = self.choices[index]
        if isinstance(event, PromptScored):
            self.prompt_scores = TokenScores(list(self.prompt_ids), event.logprobs, event.top_logprobs)
        elif isinstance(event, GenerationChunk):
            choice.texts.append(event.text)
            if self.asked is not None:
                choice.scores.extend(event.token_ids, event.logprobs, event.top_logprobs)
        elif isinstance(event, Finished):
            choice.finish_reason, choice.completion_tokens = event.finish_reason, event.completion_tokens
            return event
        return None

    def usage(self) -> Usage:
        completion_tokens = sum(c.completion_tokens for c in self.choices)
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=completion_tokens,
            total_tokens=len(self.prompt_ids) + completion_tokens,
        )

    def chat_logprobs(self, scores: TokenScores) -> dict | None:
        return None if self.table is None else {"content": self.table.chat_content(scores)}

    def completion_logprobs(self, scores: TokenScores, choice: _Choice) -> dict | None:
        if self.table is None:
            return None
        body, choice.offset = self.table.completion_logprobs(scores, choice.offset, self.asked)
        return body

    def whole(self) -> BaseModel:
        if self.chat:
            choices = [
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content="".join(c.texts)),
                    finish_reason=c.finish_reason or "length",
                    logprobs=self.chat_logprobs(c.scores),
                )
                for i, c in enumerate(self.choices)
            ]
            return ChatCompletion(
                id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
            )
        choices = []
        for i, c in enumerate(self.choices):
            scores = TokenScores()
            if self.echo is not None and self.asked is not None:
                scores.extend(self.prompt_scores.ids, self.prompt_scores.logprobs, self.prompt_scores.top)
            scores.extend(c.scores.ids, c.scores.logprobs, c.scores.top)
            choices.append(
                CompletionChoice(
                    index=i,
                    text=(self.echo or "") + "".join(c.texts),
                    finish_reason=c.finish_reason or "length",
                    logprobs=self.completion_logprobs(scores, c),
                )
            )
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage())

    def chunk(
        self,
        index: int,
        text: str | None = None,
        role: bool = False,
        finish_reason: str | None = None,
        logprobs: dict | None = None,
    ) -> dict:
        if self.chat:
            delta = Delta(role="assistant", content="") if role else Delta(content=text)
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
            body = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        else:
            choice = CompletionChoice(index=index, text=text or "", finish_reason=finish_reason)
            body = Completion(id=self.id, created=self.created, model=self.model, choices=[choice])
        data = body.model_dump(exclude_none=True)
        if logprobs is not None:  # after the dump, which would drop the nulls inside it
            data["choices"][0]["logprobs"] = logprobs
        return data

    def delta_chunk(self, index: int, event: GenerationChunk) -> dict:
        """A choice's new text, with its tokens' log-probabilities when asked for."""
        scores = TokenScores()
        if self.asked is not None:
            scores.extend(event.token_ids, event.logprobs, event.top_logprobs)
        if self.chat:
            return self.chunk(index, text=event.text, logprobs=self.chat_logprobs(scores))
        return self.chunk(index, text=event.text, logprobs=self.completion_logprobs(scores, self.choices[index]))

    def echo_chunk(self, index: int) -> dict:
        """A completion's echoed prompt, with its tokens' scores when asked for."""
        logprobs = None
        if self.prompt_scores is not None:
            logprobs = self.completion_logprobs(self.prompt_scores, self.choices[index])
        return self.chunk(index, text=self.echo, logprobs=logprobs)

    def usage_chunk(self) -> dict:
        body = self.chunk(0)
        body["choices"] = []
        body["usage"] = self.usage().model_dump()
        return body


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _failure(event: Failed, reply_id: str) -> ApiError:
    """The error a failed generation answers; an unexpected one's text goes to the log alone."""
    if event.reason == "error":
        log.error("request %s: %s", reply_id, event.message)
    if event.reason == "timeout":
        return ApiError(504, event.message, type="timeout_error", code="request_timeout")
    if event.reason == "invalid":
        return ApiError(400, event.message)
    if event.reason == "cancelled":
        return ApiError(499, event.message, code="client_closed")
    if event.reason == "shutdown":
        return ApiError(503, event.message, type="server_error", code="unavailable")
    return ApiError(500, f"the generation failed (request id {reply_id})", type="server_error")


async def _read_json(request: Request, settings: ServeSettings) -> dict:
    """The body as a JSON object, whatever the Content-Type says (curl -d sends a form type)."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, f"the request body has {declared} bytes, over this server's limit of {limit}", code="request_too_large"
        )
    body = bytearray()
    try:
        async with asyncio.timeout(settings.body_timeout):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise ApiError(
                        413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large"
                    )
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {settings.body_timeout:g} seconds",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    except ClientDisconnect:
        raise ApiError(
            499, "the client closed the connection before sending its whole body", code="client_closed"
        ) from None
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text; send a JSON object", code="invalid_json") from None
    except json.JSONDecodeError as error:
        raise ApiError(
            400,
            f"the request body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(data, dict):
        raise ApiError(
            400, f"the request body must be a JSON object, got a JSON {type(data).__name__}", code="invalid_json"
        )
    _check_json_values(data)
    return data


def _too_deep() -> ApiError:
    return ApiError(400, f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")


def _check_json_values(data: dict) -> None:
    """Refuse what JSON can carry but text cannot: lone UTF-16 surrogates ("\\ud800"), and absurd nesting."""
    pending: list[tuple[Any, int]] = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            pending += [(key, depth) for key in value] + [(item, depth + 1) for item in value.values()]
        elif isinstance(value, list):
            pending += [(item, depth + 1) for item in value]
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(
                    400,
                    'the request body holds a lone UTF-16 surrogate (such as "\\ud800"), which is '
                    "not a character; send valid Unicode text",
                    code="invalid_json",
                ) from None


def _validation_error(errors: list[dict], in_body: bool = True) -> ApiError:
    """One 400 naming the first bad field (and up to two more), from pydantic's error list."""
    messages, params = [], []
    for error in errors[:3]:
        location = list(error.get("loc", ()))
        if in_body and location and location[0] in ("body", "query", "path", "header"):
            location = location[1:]
        param = _param_name(location)
        kind, text = error.get("type", ""), str(error.get("msg", "invalid"))
        if kind == "json_invalid":
            messages.append(f"the request body is not valid JSON: {error.get('ctx', {}).get('error', text)}")
            continue
        params.append(param)
        if kind == "missing":
            messages.append(f"missing required parameter: '{param}'")
        elif kind == "extra_forbidden":
            messages.append(f"unrecognized request argument supplied: '{param}'")
        else:
            text = text.removeprefix("Value error, ")
            value = error.get("input")
            shown = f" (got {json.dumps(value)[:60]})" if isinstance(value, (int, float, str, bool)) else ""
            messages.append(f"invalid value for '{param}': {text}{shown}")
    if len(errors) > 3:
        messages.append(f"and {len(errors) - 3} more")
    return ApiError(
        400,
        "; ".join(messages),
        param=params[0] if params else None,
        code="invalid_value" if params else "invalid_json",
    )


def _param_name(location: list) -> str:
    name = ""
    for part in location:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


class _RequestGuard:
    """Pure ASGI middleware: gives each request an id (the ``x-request-id`` header), counts responses by
    endpoint and status (streams included, unbuffered), and answers an unexpected exception with a
    generic 500 that names only the request id; the traceback goes to the log, under that id."""

    def __init__(self, app: ASGIApp, server: _Server) -> None:
        self.app = app
        self.metrics = server.engine.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status, started = 500, False
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid

        async def guarded_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = dict(message, headers=[*message.get("headers", []), (b"x-request-id", rid.encode())])
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            log.exception("request %s: %s %s failed", rid, scope.get("method"), scope["path"])
            if not started:
                error = ApiError(500, f"internal server error (request id {rid})", type="server_error")
                await error.response()(scope, receive, guarded_send)
        finally:
            self.metrics.record_request(endpoint, status)


def _max_prompt_chars(tokenizer: Any, context_length: int | None) -> int | None:
    """The most characters a prompt that fits the context may have: each token spells at most as many
    characters as the vocabulary's longest token (byte-level and SentencePiece vocabularies spell a
    character with at least one symbol of their own)."""
    if tokenizer is None or context_length is None:
        return None
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=0)
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return context_length * max(longest, 1)


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's special tokens, named ones (bos, eos) and added ones (<|im_start|>)."""
    if tokenizer is None:
        return frozenset()
    ids = set(getattr(tokenizer, "all_special_ids", []))
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    return frozenset(ids)

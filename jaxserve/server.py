"""OpenAI-compatible HTTP server: ``jaxserve serve --model DIR``.

    POST /v1/completions        prompt: string | token ids | list of either; stream: SSE
    POST /v1/chat/completions   messages rendered with the tokenizer's chat template; stream: SSE
    GET  /v1/models, /health, /metrics (Prometheus text)

The engine runs in one background thread (``EngineLoop``); handlers only parse,
submit and await their per-request ``asyncio.Queue``.  Bad input gets a 400 with an
OpenAI-style error body whose ``param`` names the field; ``--api-key`` makes ``/v1/*``
answer 401 without ``Authorization: Bearer KEY``; ``--max-queue N`` answers 429 when
more than ``max_num_seqs + N`` engine requests (one per choice) would be in flight.
A stream ends with a usage chunk (``choices: []``) only when the request sets
``stream_options.include_usage``, or always with ``--enable-force-include-usage``.
A client that disconnects has its requests aborted (pages freed before the next step).
SIGTERM (or SIGINT): new requests get 503, in-flight ones finish (up to
``--drain-timeout`` seconds), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxserve.engine import Engine
from jaxserve.engine_loop import EngineFailure, EngineLoop, PromptSpec, Submission
from jaxserve.metrics import ServerMetrics
from jaxserve import tool_parsers
from jaxserve.protocol import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, RequestError
from jaxserve.structured import StructuredOutputsParams
from jaxserve.sequence import RequestOutput

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int | None = None  # engine requests beyond max_num_seqs; None: unbounded
    drain_timeout_s: float = 30.0
    force_include_usage: bool = False  # every stream ends with a usage chunk, asked for or not
    tool_call_parser: str | None = None  # tool_parsers.PARSERS; None: picked from the chat template


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none", "function", "literal", "union")


def _loc_to_param(loc: tuple) -> str:
    """pydantic's error location without its union-branch tags: ('prompt', 'list[int]', 0) -> 'prompt.0'."""
    parts = []
    for item in loc:
        if isinstance(item, str) and ("[" in item or "-" in item or item.lower() in _TYPE_TAGS):
            continue
        parts.append(str(item))
    return ".".join(parts)


def _validation_error(e: ValidationError) -> RequestError:
    errors = e.errors()
    first = errors[0]
    if len(errors) > 1 and all(err["loc"][:1] == ("prompt",) for err in errors):
        return RequestError("prompt", "prompt: must be a string, a non-empty list of token ids (integers), or a "
                            "non-empty list of strings or of token-id lists")
    param = _loc_to_param(first["loc"])
    msg = first["msg"]
    if msg.startswith("Value error, "):  # our own validators put the field first
        msg = msg[len("Value error, "):]
        param = param or msg.split(":", 1)[0]
        message = msg
    else:
        message = f"{param or 'body'}: {msg}"
    if len(errors) > 1:
        others = sorted({_loc_to_param(err["loc"]) or "body" for err in errors[1:]} - {param})
        if others:
            message += f" (also invalid: {', '.join(others[:5])})"
    return RequestError(param or None, message)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def parse_body(request: Request, model: type[BaseModel]):
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(None, f"body: larger than {MAX_BODY_BYTES} bytes", status=413)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise RequestError(None, f"body: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise RequestError(None, f"body: must be a JSON object, got {type(data).__name__}")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    except RecursionError:
        raise RequestError(None, "body: nested too deeply") from None
    ignored = sorted(k for k in data if k not in model.model_fields)
    if ignored:
        logger.warning("ignored unknown request fields: %s", ", ".join(ignored))
        req._ignored = ignored
    return req


IGNORED_FIELDS_HEADER = "X-Ignored-Fields"
FIM_TOKENS = [("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
              ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
              ("<PRE>", "<SUF>", "<MID>")]  # CodeLlama


def _fim_tokens(tokenizer) -> tuple[str, str, str] | None:
    """(prefix, suffix, middle) special tokens of a fill-in-the-middle tokenizer, if it has them."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    for names in FIM_TOKENS:
        if all(n in vocab for n in names):
            return names
    return None


def _extra_headers(req) -> dict[str, str]:
    ignored = getattr(req, "_ignored", None)
    return {IGNORED_FIELDS_HEADER: ", ".join(ignored)} if ignored else {}


# -- response building ----------------------------------------------------------------------------

def _finite(logprob: float) -> float:
    """JSON has no -inf: a zero-probability token gets -9999.0 (as vLLM reports it)."""
    return logprob if math.isfinite(logprob) else -9999.0


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _ChoiceStream:
    """What one choice has sent so far.  With stop strings, the last ``len(longest) - 1``
    characters are held back until the request finishes: the engine may still cut the text
    there, and streamed text must equal the final text."""

    def __init__(self, holdback: int):
        self.holdback = holdback
        self.sent_chars = 0
        self.sent_tokens = 0
        self.token_chars = 0  # completion logprobs' text_offset: token strings sent so far

    def advance(self, out: RequestOutput) -> tuple[str, list[int], int]:
        """(new text, new token ids, index of the first new token) to send now."""
        text = out.text or ""
        end = len(text) if out.finished else max(self.sent_chars, len(text) - self.holdback)
        delta = text[self.sent_chars:end]
        self.sent_chars = max(self.sent_chars, end)
        start = self.sent_tokens
        new_ids = out.token_ids[start:]
        self.sent_tokens = len(out.token_ids)
        return delta, new_ids, start


class OpenAIServer:
    def __init__(self, engine: Engine, config: ServerConfig, metrics: ServerMetrics | None = None,
                 warmup: Any = None, replica: Any = None):
        """``warmup(engine_loop)``: run in the engine thread once the server is up (``/health`` answers
        503 until it returned)."""
        self.engine = engine
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self.engine_loop = EngineLoop(engine, self.metrics, warmup=warmup, replica=replica)
        self.draining = False
        self.in_flight = 0  # engine requests (choices) admitted by handlers and not yet done
        self.max_in_flight = (engine.config.max_num_seqs + config.max_queue
                              if config.max_queue is not None else None)
        self.app = self._build_app()
        self.tool_parser = tool_parsers.pick_parser(getattr(engine.tokenizer, "chat_template", None),
                                                    config.tool_call_parser)

    # -- token strings for logprobs ----------------------------------------------------------

    def _token_str(self, token_id: int) -> str:
        """A token's text (decoded by the engine thread, which owns the tokenizer)."""
        return self.engine_loop.token_strings.get(token_id, f"token_id:{token_id}")

    def _completion_logprobs(self, out: RequestOutput, start: int, text_offset: int) -> dict[str, Any] | None:
        if out.logprobs is None:
            return None
        entries = out.logprobs[start:]
        tokens = [self._token_str(lp.token_id) for lp in entries]
        offsets, pos = [], text_offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [_finite(lp.logprob) for lp in entries],
                "top_logprobs": [{self._token_str(t): _finite(v) for t, v in lp.top.items()} for lp in entries],
                "text_offset": offsets}

    def _chat_logprobs(self, out: RequestOutput, start: int) -> dict[str, Any] | None:
        if out.logprobs is None:
            return None
        content = []
        for lp in out.logprobs[start:]:
            token = self._token_str(lp.token_id)
            content.append({
                "token": token, "logprob": _finite(lp.logprob), "bytes": list(token.encode("utf-8", "replace")),
                "top_logprobs": [{"token": (s := self._token_str(t)), "logprob": _finite(v),
                                  "bytes": list(s.encode("utf-8", "replace"))} for t, v in lp.top.items()]})
        return {"content": content}

    # -- admission ---------------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise RequestError("model", f"model: '{name}' does not exist; this server serves "
                               f"'{self.config.model_name}'", status=404, kind="not_found_error")

    async def _submit(self, specs: list[PromptSpec]) -> Submission:
        if self.draining:
            raise RequestError(None, "the server is shutting down", status=503, kind="service_unavailable")
        if self.max_in_flight is not None and self.in_flight + len(specs) > self.max_in_flight:
            raise RequestError(None, f"the server is busy ({self.in_flight} requests in flight, "
                               f"--max-queue {self.config.max_queue}); retry later", status=429,
                               kind="rate_limit_error")
        request_ids = [f"{uuid.uuid4().hex[:16]}-{i}" for i in range(len(specs))]
        self.in_flight += len(specs)
        try:
            return await self.engine_loop.submit(request_ids, specs)
        except ValueError as e:
            self.in_flight -= len(specs)
            message = str(e)
            raise RequestError(message.split(":", 1)[0] if ":" in message else None, message) from None
        except BaseException:
            self.in_flight -= len(specs)
            raise

    def _release(self, submission: Submission) -> None:
        """Abort what is unfinished and give back its ``--max-queue`` slots (once)."""
        submission.close()
        if not submission.released:
            submission.released = True
            self.in_flight -= len(submission.request_ids)

    @contextlib.asynccontextmanager
    async def _abort_on_disconnect(self, request: Request, submission: Submission):
        """For non-streaming responses: watch the connection and abort the requests if it closes."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            if len(submission.finished) < len(submission.request_ids):
                logger.info("client disconnected: aborting %s", ", ".join(submission.request_ids))
            submission.close()

        task = asyncio.create_task(watch())
        try:
            yield
        finally:
            task.cancel()

    # -- endpoints -------------------------------------------------------------------------------------

    def _engine_logprobs(self, req, logprobs: int | None) -> int | None:
        """best_of > n ranks the candidates by cumulative logprob, so the engine computes logprobs."""
        return 0 if logprobs is None and req.num_candidates > req.n else logprobs

    def _completion_specs(self, req: CompletionRequest) -> list[PromptSpec]:
        prompts = req.prompts()
        k = req.num_candidates
        if len(prompts) * k > MAX_CHOICES:
            name = "best_of" if req.best_of else "n"
            raise RequestError(name, f"{name}: {len(prompts)} prompts x {name}={k} exceeds {MAX_CHOICES} choices")
        if req.suffix is not None:
            fim = _fim_tokens(self.engine.tokenizer)
            if fim is None:
                raise RequestError("suffix", "suffix: this model's tokenizer has no fill-in-the-middle tokens "
                                   "(e.g. <fim_prefix>, <fim_suffix>, <fim_middle>)")
            if not all(isinstance(p, str) for p in prompts):
                raise RequestError("suffix", "suffix: needs text prompts")
            prompts = [f"{fim[0]}{p}{fim[1]}{req.suffix}{fim[2]}" for p in prompts]
        auto = req.max_tokens is None
        specs = []
        for prompt in prompts:
            for seed in req.seeds(k):
                params = req.sampling_params(1 if auto else req.max_tokens,
                                             self._engine_logprobs(req, req.logprobs), auto=auto)
                params.seed = seed
                specs.append(PromptSpec(prompt, params, add_special_tokens=True, max_tokens_auto=auto))
        return specs

    def _chat_specs(self, req: ChatCompletionRequest) -> list[PromptSpec]:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise RequestError("messages", "messages: this model has no chat template; use /v1/completions "
                               "or serve a model whose tokenizer_config.json has a chat_template")
        try:
            text = tok.apply_chat_template(req.rendered_messages(), tools=req.tools or None, tokenize=False,
                                           add_generation_prompt=req.add_generation_prompt)
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja raises many types
            raise RequestError("messages", f"messages: the chat template failed: {str(e)[:300]}") from None
        limit = req.limit()
        logprobs = self._engine_logprobs(req, req.num_logprobs())
        if req.num_candidates > MAX_CHOICES:
            raise RequestError("best_of", f"best_of: exceeds {MAX_CHOICES} choices")
        mode, name = req.tool_mode()
        forced = None  # tool_choice required / named: the call's JSON schema constrains the output
        if mode == "required":
            forced = StructuredOutputsParams(json=tool_parsers.required_schema(req.tools, req.parallel_tool_calls),
                                             field="tool_choice")
        elif mode == "named":
            forced = StructuredOutputsParams(json=tool_parsers.named_schema(req.tools, name), field="tool_choice")
        specs = []
        for seed in req.seeds(req.num_candidates):
            params = req.sampling_params(limit or 1, logprobs, auto=limit is None)
            params.seed = seed
            if forced is not None:
                params.structured_outputs = forced
            specs.append(PromptSpec(text, params, add_special_tokens=False, max_tokens_auto=limit is None))
        return specs

    async def completions(self, request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        self._check_model(req.model)
        req.check_supported()
        self._echo_texts(req)  # a prompt that cannot be echoed is rejected before anything runs
        submission = await self._submit(self._completion_specs(req))
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": self.config.model_name}
        if req.stream:
            return self._stream(submission, header, req, chat=False)
        return await self._complete(request, submission, header, req, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest)
        self._check_model(req.model)
        req.check_supported()
        submission = await self._submit(self._chat_specs(req))
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                  "created": int(time.time()), "model": self.config.model_name}
        if req.stream:
            return self._stream(submission, header, req, chat=True)
        return await self._complete(request, submission, header, req, chat=True)

    def _tool_calls(self, req: ChatCompletionRequest, out: RequestOutput):
        """(content, tool calls, finish_reason) of a finished chat reply: calls forced by tool_choice
        are read as their JSON schema wrote them, others with the model family's parser."""
        text = out.text or ""
        mode, name = req.tool_mode()
        calls = []
        if mode == "required":
            calls = tool_parsers.parse_required(text)
        elif mode == "named":
            calls = tool_parsers.parse_named(text, name)
        elif mode == "auto":
            content, calls = tool_parsers.parse_tool_calls(text, self.tool_parser)
            if calls:
                return content, calls, "tool_calls"
        if not calls:
            return text, [], out.finish_reason
        # OpenAI: "tool_calls" when the model chose to call; a named tool_choice finishes with "stop".
        return None, calls, "stop" if mode == "named" else "tool_calls"

    def _echo_texts(self, req) -> list[str] | None:
        """Per prompt, the text an ``echo`` completion starts with (token-id prompts decoded)."""
        if not getattr(req, "echo", False):
            return None
        tok = self.engine.tokenizer
        out = []
        for p in req.prompts():
            if isinstance(p, str):
                out.append(p)
            elif tok is not None:
                out.append(tok.decode(p, skip_special_tokens=req.skip_special_tokens))
            else:
                raise RequestError("echo", "echo: token-id prompts need a tokenizer to be echoed")
        return out

    @staticmethod
    def _best(req, outs: list[RequestOutput]) -> list[RequestOutput]:
        """Per prompt, the ``n`` of its ``best_of`` candidates with the highest cumulative logprob (in
        that order); logprobs only where the request asked for them."""
        k = req.num_candidates
        if k == req.n:
            return outs
        wanted = (req.num_logprobs() if hasattr(req, "num_logprobs") else req.logprobs) is not None
        chosen = []
        for start in range(0, len(outs), k):
            group = outs[start:start + k]
            group.sort(key=lambda o: -sum(lp.logprob for lp in (o.logprobs or [])))
            chosen += [o if wanted else dataclasses.replace(o, logprobs=None) for o in group[:req.n]]
        return chosen

    async def _complete(self, request: Request, submission: Submission, header: dict, req, chat: bool) -> Response:
        echo = None if chat else self._echo_texts(req)
        try:
            async with self._abort_on_disconnect(request, submission):
                async for _ in submission.outputs():
                    pass
        except EngineFailure as e:
            return error_response(e.status, str(e), "internal_error")
        finally:
            self._release(submission)
        outs = [submission.finished[i] for i in sorted(submission.finished)]
        if len(outs) < len(submission.request_ids):  # aborted: the client is gone
            return error_response(499, "request aborted (client disconnected)", "aborted")
        k = req.num_candidates
        prompt_tokens = sum(len(out.prompt_token_ids) for i, out in enumerate(outs) if i % k == 0)
        completion_tokens = sum(len(out.token_ids) for out in outs)  # all candidates were generated
        outs = self._best(req, outs)
        choices = []
        for index, out in enumerate(outs):
            if chat:
                content, calls, finish = self._tool_calls(req, out)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = [c.to_openai() for c in calls]
                choice = {"index": index, "message": message, "logprobs": self._chat_logprobs(out, 0),
                          "finish_reason": finish}
            else:
                text = (echo[index // req.n] if echo else "") + (out.text or "")
                choice = {"index": index, "text": text,
                          "logprobs": self._completion_logprobs(out, 0, 0), "finish_reason": out.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = out.token_ids
                choice["prompt_token_ids"] = out.prompt_token_ids
            if req.prompt_logprobs is not None and not chat:
                choice["prompt_logprobs"] = self._prompt_logprobs(out)
            choices.append(choice)
        usage = _usage(prompt_tokens, completion_tokens)
        body = {**header, "choices": choices, "usage": usage}
        if req.prompt_logprobs is not None and chat:  # vLLM: at the top of a chat response, of the prompt
            body["prompt_logprobs"] = self._prompt_logprobs(outs[0])
        return JSONResponse(body, headers=_extra_headers(req))

    def _prompt_logprobs(self, out: RequestOutput) -> list[dict[str, Any] | None] | None:
        """vLLM's format: per prompt token, None for the first, else {token id: {logprob, rank,
        decoded_token}} of the prompt token and the top ones."""
        if out.prompt_logprobs is None:
            return None
        entries = []
        for lp in out.prompt_logprobs:
            if lp is None:
                entries.append(None)
                continue
            ranked = {lp.token_id: (lp.logprob, lp.rank)}
            for i, (t, v) in enumerate(lp.top.items()):
                ranked.setdefault(t, (v, i + 1))
            entries.append({str(t): {"logprob": _finite(v), "rank": r, "decoded_token": self._token_str(t)}
                            for t, (v, r) in ranked.items()})
        return entries

    def _stream(self, submission: Submission, header: dict, req, chat: bool) -> StreamingResponse:
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        holdback = max((len(s) - 1 for s in stops), default=0)
        include_usage = self.config.force_include_usage or req.include_usage()
        chunk_header = {**header, "object": "chat.completion.chunk" if chat else "text_completion"}
        if include_usage:  # as OpenAI: the other chunks carry "usage": null
            chunk_header["usage"] = None
        echo = None if chat else self._echo_texts(req)
        tools = chat and req.tool_mode()[0] != "none"

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def body() -> AsyncIterator[str]:
            states = [_ChoiceStream(holdback) for _ in submission.request_ids]
            prompt_tokens: dict[int, int] = {}
            echoed: set[int] = set()
            try:
                if chat:
                    for i in range(len(states)):
                        yield event({**chunk_header, "choices": [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]})
                async for index, out in submission.outputs():
                    prompt_tokens[index] = len(out.prompt_token_ids)
                    state = states[index]
                    if tools and not out.finished:  # a reply that may hold tool calls is sent when complete
                        continue
                    delta, new_ids, start = state.advance(out)
                    if not delta and not out.finished and not (req.return_token_ids and new_ids) \
                            and out.logprobs is None and not (echo and index not in echoed):
                        continue
                    if chat and tools:
                        content, calls, finish = self._tool_calls(req, out)
                        d: dict[str, Any] = {"content": content} if content else {}
                        if calls:
                            d["tool_calls"] = [c.to_openai(k) for k, c in enumerate(calls)]
                        choice = {"index": index, "delta": d, "logprobs": self._chat_logprobs(out, start),
                                  "finish_reason": finish}
                    elif chat:
                        choice = {"index": index, "delta": {"content": delta} if delta else {},
                                  "logprobs": self._chat_logprobs(out, start), "finish_reason": out.finish_reason}
                    else:
                        if echo and index not in echoed:
                            echoed.add(index)
                            delta = echo[index // req.n] + delta
                        logprobs = self._completion_logprobs(out, start, state.token_chars)
                        if logprobs is not None:
                            state.token_chars += sum(len(t) for t in logprobs["tokens"])
                        choice = {"index": index, "text": delta, "logprobs": logprobs,
                                  "finish_reason": out.finish_reason}
                    if req.return_token_ids:
                        choice["token_ids"] = new_ids
                        if start == 0:
                            choice["prompt_token_ids"] = out.prompt_token_ids
                    yield event({**chunk_header, "choices": [choice]})
                if include_usage:
                    total_prompt = sum(v for i, v in prompt_tokens.items() if i % req.n == 0)
                    completion = sum(s.sent_tokens for s in states)
                    yield event({**chunk_header, "choices": [], "usage": _usage(total_prompt, completion)})
                yield "data: [DONE]\n\n"
            except EngineFailure as e:
                yield event(error_body(str(e), "internal_error", None, e.status))
                yield "data: [DONE]\n\n"
            finally:
                if len(submission.finished) < len(submission.request_ids):
                    logger.info("stream ended early (client gone?): aborting %s", ", ".join(submission.request_ids))
                self._release(submission)

        return _SubmissionStream(body(), release=lambda: self._release(submission), headers=_extra_headers(req))

    # -- app -------------------------------------------------------------------------------------------

    def authorized(self, headers: Headers) -> bool:
        if self.config.api_key is None:
            return True
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.config.api_key.encode())

    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            self.engine_loop.start()
            try:
                yield
            finally:
                self.draining = True
                await asyncio.to_thread(self.engine_loop.stop)

        app = FastAPI(title="jaxserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(_Guard, server=self)
        metrics = self.metrics

        @app.exception_handler(RequestError)
        async def on_request_error(request: Request, e: RequestError):
            return error_response(e.status, e.message, e.kind, e.param)

        @app.exception_handler(ValueError)
        async def on_value_error(request: Request, e: ValueError):
            # The project's convention: ValueError means bad input, its message starting with the field.
            message = str(e)
            field, sep, _ = message.partition(":")
            return error_response(400, message, "invalid_request_error", field if sep and " " not in field else None)

        @app.exception_handler(StarletteHTTPException)
        async def on_http_error(request: Request, e: StarletteHTTPException):
            return error_response(e.status_code, str(e.detail), "invalid_request_error")

        @app.exception_handler(Exception)
        async def on_error(request: Request, e: Exception):
            logger.exception("unhandled error on %s", request.url.path)
            return error_response(500, f"internal error: {type(e).__name__}", "internal_error")

        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{
                "id": self.config.model_name, "object": "model", "created": 0, "owned_by": "jaxserve",
                "max_model_len": self.engine.max_model_len}]}

        @app.get("/health")
        async def health():
            if not self.engine_loop.alive:
                return error_response(503, "the engine loop is not running", "service_unavailable")
            if not self.engine_loop.ready:
                done, total = self.engine_loop.warmup_progress
                body = error_body(f"warming up: {done}/{total} step programs compiled or loaded",
                                  "service_unavailable", None, 503)
                return JSONResponse({**body, "status": "warming_up"}, status_code=503)
            if self.draining:
                return error_response(503, "the server is shutting down", "service_unavailable")
            return {"status": "ok"}

        @app.get("/metrics")
        async def prometheus():
            return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

        return app


class _SubmissionStream(StreamingResponse):
    """An SSE response that releases its submission however it ends, even when the client is
    gone before the body generator ever started (its ``finally`` would then never run)."""

    def __init__(self, content: AsyncIterator[str], release, headers: dict[str, str] | None = None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._release_submission = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release_submission()


class _Guard:
    """ASGI middleware: API-key check on /v1/*, responses counted by status, generation requests
    in flight (a plain ASGI middleware, so that streaming and disconnects pass through untouched)."""

    GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, server: OpenAIServer):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.server.metrics
        path = scope.get("path", "")

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                metrics.on_response(int(message["status"]))
            await send(message)

        if path.startswith("/v1/") and not self.server.authorized(Headers(scope=scope)):
            response = error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                      "authentication_error")
            await response(scope, receive, counting_send)
            return
        generating = path in self.GENERATE_PATHS
        if generating:
            metrics.add_in_flight(1)
        try:
            await self.app(scope, receive, counting_send)
        finally:
            if generating:
                metrics.add_in_flight(-1)


# -- running it ------------------------------------------------------------------------------------

def _make_uvicorn_server(server: OpenAIServer, host: str, port: int, log_level: str):
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn, except that a SIGTERM/SIGINT marks the app as draining and that, once the graceful
        shutdown is done, the process exits 0 instead of re-raising the signal."""

        @contextlib.contextmanager
        def capture_signals(self):
            def on_signal(sig: int, frame) -> None:
                if not server.draining:
                    logger.info("received %s: draining (up to %.0fs)", signal.Signals(sig).name,
                                server.config.drain_timeout_s)
                server.draining = True
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

            previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=server.config.drain_timeout_s, access_log=False,
                            lifespan="on")
    return _Server(config)


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, max_queue: int | None = None, drain_timeout_s: float = 30.0,
          force_include_usage: bool = False, tool_call_parser: str | None = None, log_level: str = "warning",
          warmup: bool = True, progress: bool = False, model_label: str | None = None, full_warmup: bool = False,
          replica: Any = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0 after a graceful shutdown).

    The port is bound first; with ``warmup`` the step programs are then compiled (or loaded from
    the compile cache) in the engine thread, ``/health`` answering 503 meanwhile, and one ``ready``
    line goes to stderr when it is done (at once without ``warmup``).  Ready means: the buckets that
    hold every step are compiled (``Engine.warmup_for_serving``), the others compile in the
    background and steps use a larger compiled bucket until then; ``full_warmup``: every bucket
    first.  ``replica``: process 0's ``replica.Leader`` under ``serve --distributed``."""
    if max_queue is not None and max_queue < 0:
        raise ValueError(f"max_queue: must be >= 0, got {max_queue}")
    address = f"http://{host}:{port}"
    label = model_label or model_name or "jaxserve"

    def warm(loop: EngineLoop) -> None:
        if warmup:
            def on_bucket(done: int, total: int) -> None:
                loop.warmup_progress = (done, total)

            if full_warmup:
                engine.warmup(progress=progress, on_bucket=on_bucket)
            else:
                engine.warmup_for_serving(progress=progress, on_bucket=on_bucket)
        line = engine.ready_line(label, address)
        if engine.background_compile_pending:
            line += (f"; {engine.background_programs} more step programs compile in the background (until each is ready, its steps "
                     "run padded in a larger compiled bucket)")
        print(line, file=sys.stderr, flush=True)

    server = OpenAIServer(engine, ServerConfig(model_name or "jaxserve", api_key, max_queue, drain_timeout_s,
                                               force_include_usage, tool_call_parser), warmup=warm, replica=replica)
    uv = _make_uvicorn_server(server, host, port, log_level)
    logger.info("serving %s on %s (%s)", server.config.model_name, address,
                ("warming up all step programs ahead of time" if full_warmup else
                 "warming up the step programs that hold every step, the others in the background")
                if warmup else "step programs compiled on demand")
    try:
        uv.run()
    finally:
        engine.stop_background_compile()
    return 0 if uv.started else 1


def default_model_name(model_dir: str) -> str:
    return os.path.basename(os.path.normpath(model_dir)) or model_dir

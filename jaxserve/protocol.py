"""OpenAI API request bodies (pydantic, strict types) and their mapping to ``SamplingParams``.

Strict mode: ``"max_tokens": "5"`` or ``true`` is an error, not a coercion; ints are accepted
where a float is expected.  Unknown fields are ignored (as vLLM does) and named in the
``X-Ignored-Fields`` response header; fields that the engine cannot honour (``suffix``
without fill-in-the-middle tokens, ``echo`` with ``logprobs``, ``prompt_logprobs`` with ``stream``)
are rejected with a 400 naming them rather than silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, StrictStr, model_validator

from jaxserve.sampling import MAX_LOGPROBS, SamplingParams
from jaxserve.structured import StructuredOutputsParams

MAX_CHOICES = 256  # prompts x n in one HTTP request
INT32_MAX = 2**31 - 1
INT64_LIMIT = 2**63


class RequestError(ValueError):
    """Bad input: ``param`` names the field (``message`` starts with it too)."""

    def __init__(self, param: str | None, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param = param
        self.message = message
        self.status = status
        self.kind = kind


def _check_text(value: str, field: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(field, f"{field}: is not valid Unicode (lone surrogate at {e.start})") from None
    return value


Stop = Union[StrictStr, Annotated[list[StrictStr], Field(max_length=64)], None]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class _Sampling(BaseModel):
    """Fields common to both endpoints (OpenAI names, plus vLLM's extras)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: StrictStr | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    temperature: Annotated[float, Field(ge=0, le=1e4)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=INT64_LIMIT)] | None = None
    stop: Stop = None
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0, lt=INT64_LIMIT)]], Field(max_length=64)] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    user: StrictStr | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Annotated[dict[StrictStr, float], Field(max_length=4096)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    # vLLM's extra sampling parameters.
    repetition_penalty: Annotated[float, Field(gt=0, le=1e4)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    bad_words: Annotated[list[StrictStr], Field(max_length=128)] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    speculative: StrictBool = True  # jaxserve's: false never speculates this request (SamplingParams.speculative)
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    # vLLM extension: return prompt_token_ids and token_ids with the choices.
    return_token_ids: StrictBool = False
    # Top-level fields of the body that no field here takes (ignored; named in a response header).
    _ignored: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.stop, str):
            _check_text(self.stop, "stop")
        elif self.stop is not None:
            for s in self.stop:
                _check_text(s, "stop")
            if any(not s for s in self.stop):
                raise ValueError("stop: stop strings must be non-empty")
        if self.stream_options is not None:
            include = self.stream_options.get("include_usage", False)
            if not isinstance(include, bool):
                raise ValueError("stream_options.include_usage: must be a boolean")
        return self

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``choices: []``): only when asked, as in OpenAI's API."""
        return bool((self.stream_options or {}).get("include_usage", False))

    def check_supported(self) -> None:
        if self.prompt_logprobs is not None and self.stream:
            raise RequestError("prompt_logprobs", "prompt_logprobs: is not supported with stream")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise RequestError("best_of", f"best_of: must be >= n ({self.n}), got {self.best_of}")
            if self.stream and self.best_of > self.n:
                raise RequestError("best_of", "best_of: streaming needs best_of == n")
        self.logit_bias_ids()
        self.structured()

    def structured(self) -> StructuredOutputsParams | None:
        """The request's output constraint, from whichever one field gives it (400 naming the field)."""
        given: list[tuple[str, dict]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                schema = js.get("schema", js.get("json_schema")) if isinstance(js, dict) else None
                if not isinstance(schema, dict):
                    raise RequestError("response_format", "response_format: json_schema.schema must be a JSON "
                                       "schema object")
                given.append(("response_format", {"json": schema}))
            elif kind != "text":
                raise RequestError("response_format", f"response_format: type must be 'text', 'json_object' or "
                                   f"'json_schema', got {str(kind)[:40]!r}")
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given.append((name, {key: getattr(self, name)}))
        if not given:
            return None
        if len(given) > 1:
            raise RequestError(given[1][0], f"{given[1][0]}: only one output constraint per request "
                               f"({', '.join(n for n, _ in given)} were given)")
        field, value = given[0]
        try:
            return StructuredOutputsParams.from_dict(value, field)
        except ValueError as e:
            raise RequestError(field, str(e)) from None

    @property
    def num_candidates(self) -> int:
        """Engine requests per prompt: best_of (the n best by cumulative logprob are returned) or n."""
        return self.best_of or self.n

    def logit_bias_ids(self) -> dict[int, float] | None:
        """``logit_bias`` with OpenAI's string keys as token ids."""
        if not self.logit_bias:
            return None
        out = {}
        for k, v in self.logit_bias.items():
            try:
                t = int(k)
            except ValueError:
                t = -1
            if t < 0 or str(t) != k.strip():
                raise RequestError("logit_bias", f"logit_bias: key {k[:40]!r} is not a token id "
                                   "(a non-negative integer as a string)")
            out[t] = v
        return out

    def sampling_params(self, max_tokens: int, logprobs: int | None, auto: bool = False) -> SamplingParams:
        """``auto``: ``max_tokens`` is a placeholder (the engine loop sets it to what the context leaves)."""
        if auto:
            max_tokens = max(max_tokens, self.min_tokens)
        elif self.min_tokens > max_tokens:
            raise RequestError("min_tokens", f"min_tokens: must be <= max_tokens ({max_tokens}), "
                               f"got {self.min_tokens}")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else float(self.temperature),
                top_p=1.0 if self.top_p is None else float(self.top_p),
                top_k=-1 if self.top_k is None else self.top_k,
                min_p=0.0 if self.min_p is None else float(self.min_p),
                seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                prompt_logprobs=self.prompt_logprobs,
                ignore_eos=self.ignore_eos, logprobs=logprobs,
                presence_penalty=float(self.presence_penalty or 0.0),
                frequency_penalty=float(self.frequency_penalty or 0.0),
                repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
                logit_bias=self.logit_bias_ids(), min_tokens=self.min_tokens,
                bad_words=self.bad_words, include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens, structured_outputs=self.structured(),
                speculative=self.speculative)
        except ValueError as e:
            raise RequestError(str(e).split(":", 1)[0], str(e)) from None

    def seeds(self, count: int) -> list[int | None]:
        """Per-choice seeds: choice i of a seeded request uses seed + i, so choices differ."""
        if self.seed is None:
            return [None] * count
        return [(self.seed + i) % INT64_LIMIT for i in range(count)]


PromptInput = Union[StrictStr, TokenIds, Annotated[list[StrictStr], Field(min_length=1)],
                    Annotated[list[TokenIds], Field(min_length=1)]]


class CompletionRequest(_Sampling):
    prompt: PromptInput
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [_check_text(p, "prompt")]
        if p and isinstance(p[0], int):
            return [p]
        return [_check_text(x, "prompt") if isinstance(x, str) else x for x in p]

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo and self.logprobs is not None:
            raise RequestError("echo", "echo: with logprobs needs prompt logprobs, which this server does not "
                               "compute (use echo or logprobs)")
        if self.suffix is not None:
            _check_text(self.suffix, "suffix")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: StrictStr | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True
    add_generation_prompt: StrictBool = True

    def rendered_messages(self) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(self.messages):
            msg: dict[str, Any] = {"role": m.role, "content": _check_text(m.text(), f"messages.{i}.content")}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                calls = []
                for j, c in enumerate(m.tool_calls):
                    fn = c.get("function") if isinstance(c, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise RequestError(f"messages.{i}.tool_calls", f"messages.{i}.tool_calls.{j}: needs "
                                           "function.name")
                    args = fn.get("arguments", {})
                    if isinstance(args, str):  # templates write the arguments as a mapping (as vLLM passes them)
                        try:
                            args = json.loads(args) if args.strip() else {}
                        except ValueError:
                            raise RequestError(f"messages.{i}.tool_calls", f"messages.{i}.tool_calls.{j}: "
                                               "function.arguments is not JSON") from None
                    calls.append({"id": c.get("id"), "type": "function",
                                  "function": {"name": fn["name"], "arguments": args}})
                msg["tool_calls"] = calls
            out.append(msg)
        return out

    def tool_mode(self) -> tuple[str, str | None]:
        """(``none`` | ``auto`` | ``required`` | ``named``, the named function)."""
        tc = self.tool_choice
        if not self.tools:
            if tc not in (None, "none"):
                raise RequestError("tool_choice", "tool_choice: needs tools")
            return "none", None
        if tc is None or tc == "auto":
            return "auto", None
        if tc in ("none", "required"):
            return tc, None
        if isinstance(tc, dict) and tc.get("type") == "function" and isinstance(tc.get("function"), dict) \
                and isinstance(tc["function"].get("name"), str):
            name = tc["function"]["name"]
            if name not in {t["function"]["name"] for t in self.tools}:
                raise RequestError("tool_choice", f"tool_choice: function {name[:64]!r} is not in tools")
            return "named", name
        raise RequestError("tool_choice", "tool_choice: must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}")

    def check_tools(self) -> None:
        for i, t in enumerate(self.tools or []):
            fn = t.get("function")
            if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not fn["name"]:
                raise RequestError(f"tools.{i}", f"tools.{i}: must be {{'type': 'function', 'function': "
                                   "{'name': ..., 'parameters': {...}}}")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise RequestError(f"tools.{i}", f"tools.{i}.function.parameters: must be a JSON schema object")
        mode, _ = self.tool_mode()
        if mode in ("required", "named") and self.structured() is not None:
            raise RequestError("tool_choice", f"tool_choice: {mode} cannot be combined with response_format or "
                               "another output constraint")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs", "top_logprobs: needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        super().check_supported()
        self.check_tools()

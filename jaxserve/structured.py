"""Structured outputs: a request's output constrained to a JSON schema, a regex, a choice or a grammar.

The grammar engine is ``xgrammar`` (picked over ``llguidance`` by per-token mask time on SmolLM2's
49,152-token vocabulary, measured on this project's CPU machine; see the README).  Per request, a
``GrammarMatcher`` follows the tokens it generates; before each step that samples for it, its
allowed-token set is written on the host into its row of a ``[rows, ceil(vocab / 32)]`` int32 bitmask
(bit ``t % 32`` of word ``t // 32``: token ``t`` is allowed), and the step applies the bitmask to the
logits on the device, behind a ``lax.cond`` on "some row is constrained" (``apply_token_bitmask``), so
batches without constraints run the plain sampler and their rows are never touched.

``StructuredOutputsParams`` takes vLLM's names (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``); exactly one is set.  ``field`` is the request field it came from (for messages:
``response_format``, ``guided_json``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass
class StructuredOutputsParams:
    """One constraint on a request's output (vLLM's ``StructuredOutputsParams`` names)."""

    json: dict | str | None = None  # a JSON schema (dict or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # an EBNF (GBNF) grammar with a ``root`` rule
    json_object: bool = False  # any JSON object
    field: str = "structured_outputs"  # the request field it came from (error messages name it)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def validate(self) -> None:
        f = self.field
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"{f}: exactly one of {', '.join(KINDS)} must be given, got "
                             f"{', '.join(set_) or 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"{f}: the JSON schema is not valid JSON ({e})") from None
            if not isinstance(self.json, (dict, bool)):
                raise ValueError(f"{f}: a JSON schema must be an object, got {type(self.json).__name__}")
        if self.regex is not None:
            if not isinstance(self.regex, str) or not self.regex:
                raise ValueError(f"{f}: regex must be a non-empty string")
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"{f}: the regex does not compile ({e})") from None
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"{f}: choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"{f}: grammar must be a non-empty string")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"{f}: json_object must be a boolean")

    @classmethod
    def from_dict(cls, value: Any, field: str = "structured_outputs") -> "StructuredOutputsParams":
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{field}: must be an object with one of {', '.join(KINDS)}")
        known = {k: v for k, v in value.items() if k in KINDS}
        return cls(**known, field=field)


def choice_regex(choices: list[str]) -> str:
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def import_xgrammar():
    """``import xgrammar``, then put the default SIGSEGV action back.

    xgrammar loads apache-tvm-ffi, whose SIGSEGV handler prints a backtrace through the C++ unwinder.  When
    the fault is inside the unwinder itself, that handler blocks forever on the unwinder's lock, holding the
    GIL, so the whole process hangs instead of crashing (seen in the test suite: a C++ exception thrown by
    an XLA compile in the background-compile thread faulted while unwinding).  A crash is the better
    failure: a server that dies is restarted, one that hangs is not."""
    first = "xgrammar" not in sys.modules
    import xgrammar

    if first:
        restore_default_segv()
    return xgrammar


def restore_default_segv() -> None:
    """SIGSEGV back to the default action, from any thread (``signal.signal`` works only in the main one)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None)
        libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
        libc.signal(int(signal.SIGSEGV), None)  # SIG_DFL
    except (OSError, AttributeError):  # not a libc platform
        pass


class GrammarBackend:
    """xgrammar's tokenizer info and grammar compiler for one engine (compiled grammars are cached)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        xgr = import_xgrammar()

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
        self._lock = threading.Lock()

    def compile(self, p: StructuredOutputsParams):
        f = p.field
        try:
            with self._lock:
                if p.json is not None:
                    schema = p.json if isinstance(p.json, dict) else {}
                    return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
                if p.json_object:
                    return self.compiler.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False)
                if p.regex is not None:
                    return self.compiler.compile_regex(p.regex)
                if p.choice is not None:
                    return self.compiler.compile_regex(choice_regex(p.choice))
                return self.compiler.compile_grammar(p.grammar)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError / its own types
            what = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
                    "choice": "choice", "grammar": "grammar"}[p.kind]
            raise ValueError(f"{f}: the {what} does not compile ({str(e).strip()[:300]})") from None

    def matcher(self, p: StructuredOutputsParams):
        return self._xgr.GrammarMatcher(self.compile(p))

    def fill(self, matchers: list, bitmask: np.ndarray, rows: list[int]) -> None:
        """Write each matcher's allowed tokens into its row of ``bitmask`` ([S, words] int32)."""
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, rows[0])
        else:
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array, active: jax.Array) -> jax.Array:
    """Logits of disallowed tokens set to -inf, on rows where ``active`` ([S] bool) says so; the whole of
    it runs only when some row is active (``bitmask``: [S, ceil(V / 32)] int32, bit set = allowed)."""
    v = logits.shape[-1]

    def masked():
        ids = jnp.arange(v, dtype=jnp.int32)
        words = bitmask[:, ids // 32]
        allowed = ((words >> (ids % 32)[None, :]) & 1).astype(bool)
        return jnp.where(active[:, None] & ~allowed, -jnp.inf, logits)

    return jax.lax.cond(jnp.any(active), masked, lambda: logits)

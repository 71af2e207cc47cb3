"""Tokenizer loading and incremental detokenization (text deltas as tokens arrive)."""

from __future__ import annotations

import logging
import os

from jaxserve.sequence import Sequence

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model_dir: str):
    """``transformers.AutoTokenizer`` from the model directory, or None when it ships no tokenizer."""
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
        logger.info("no tokenizer in %s: prompts must be token ids", model_dir)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"model: could not load the tokenizer in {model_dir}: {e}") from e


def detokenize_incrementally(tokenizer, seq: Sequence) -> str:
    """Append the text of newly generated tokens to ``seq.text`` and return the delta.

    Decodes a short window of tokens (``prefix_offset:``) and compares it with the
    text of the window before the new tokens, as vLLM does, so that spacing
    rules of the tokenizer are respected and a partial UTF-8 character waits
    for the token that completes it.
    """
    ids = seq.all_token_ids
    skip = seq.params.skip_special_tokens
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    delta = full[len(prefix):]
    seq.prefix_offset = seq.read_offset
    seq.read_offset = len(ids)
    seq.text += delta
    return delta

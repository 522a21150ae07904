"""The filter that drops vLLM's chat-template warm-up traceback (logged on every start
with ``skip_tokenizer_init=True``) drops that record only."""

from __future__ import annotations

import logging

from megatron_lpreg.rollout.vllm_engine import _NoTokenizerWarmup


def _record(msg: str, exc: BaseException | None) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("vllm.renderers.base", logging.WARNING, __file__, 1, msg, None, info)


def test_only_the_tokenizerless_warmup_failure_is_dropped():
    keep = _NoTokenizerWarmup().filter
    tokenizer = ValueError("Tokenizer not available when `skip_tokenizer_init=True`")
    assert not keep(_record("Chat template warmup failed", tokenizer))
    assert keep(_record("Chat template warmup failed", ValueError("bad template syntax")))
    assert keep(_record("Chat template warmup failed", RuntimeError("skip_tokenizer_init")))
    assert keep(_record("Chat template warmup failed", None))
    assert keep(_record("something else", tokenizer))

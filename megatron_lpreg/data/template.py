"""How a row's prompt becomes the text the model sees, and which tokens end a response.

Three templates (``data.prompt_template``):

* ``zero``: the Lp-Reg reference's default (its ``data.zero: True``, which its
  recipes keep): the *last* message's content inside a fixed instruction that
  asks for ``<think>`` / ``<answer>`` tags and opens the thinking block. No chat
  template, no special tokens; the paper's base models are trained on this.
* ``chat``: the tokenizer's chat template with the generation prompt.
* ``plain``: the messages' texts, concatenated.

Every template renders to a string first and is tokenised with
``add_special_tokens=False`` (what the chat template's own tokenisation does too),
so :func:`render_prompt` shows exactly what :func:`encode_prompt` feeds the model.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATES = ("zero", "chat", "plain")

# Byte for byte the reference's string (its rl_dataset.py): one line break after
# "{prompt}.", one after "step by step.", none after "<think>".
ZERO_PREFIX = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: "
)
ZERO_SUFFIX = ".\nAssistant: Let me solve this step by step.\n<think>"


class TemplateError(ValueError):
    pass


def as_messages(prompt) -> list[dict]:
    """A plain string or a list of ``{role, content}`` chat messages -> messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return prompt
    raise TemplateError(f"prompt must be a string or a non-empty list of chat messages, got {type(prompt).__name__}")


def render_prompt(tokenizer, prompt, template: str) -> str:
    """The exact text that is tokenised for ``prompt`` (a string or chat messages)."""
    messages = as_messages(prompt)
    if template == "zero":
        return ZERO_PREFIX + str(messages[-1]["content"]) + ZERO_SUFFIX
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("data.prompt_template=chat but the tokenizer has no chat template; "
                                "use zero or plain")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if template == "plain":
        return "".join(str(m["content"]) for m in messages)
    raise TemplateError(f"prompt template {template!r} is not one of {TEMPLATES}")


def encode_prompt(tokenizer, prompt, *, template: str, max_tokens: int) -> list[int]:
    """Token ids of the rendered prompt, left-truncated to ``max_tokens`` (the question's
    end and the generation prompt are what must survive)."""
    ids = list(tokenizer.encode(render_prompt(tokenizer, prompt, template), add_special_tokens=False))
    return ids[-max_tokens:] if len(ids) > max_tokens else ids


def end_token_ids(tokenizer, model_dir: str | Path | None = None) -> tuple[int, ...]:
    """Every token that ends a response: the tokenizer's eos and the ids of
    ``generation_config.json``'s ``eos_token_id`` (an int or a list: ChatML models end
    turns with ``<|im_end|>`` besides ``<|endoftext|>``). Tokenizer's eos first."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_dir is not None:
        path = Path(model_dir) / "generation_config.json"
        if path.exists():
            try:
                value = json.loads(path.read_text()).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise TemplateError(f"{path}: not JSON ({e.msg})") from None
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int) and not isinstance(v, bool) and v not in ids:
                    ids.append(v)
    return tuple(ids)

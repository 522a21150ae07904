"""Prompt / answer datasets (DAPO-Math-17k layout) and a resumable shuffled order.

A row is a JSON object (a JSONL line or a parquet row):

    {"prompt": [{"role": "user", "content": "..."}], "reward_model": {"ground_truth": "..."}, ...}

``prompt_key`` and ``answer_key`` are dotted paths, so other layouts work by
configuration. Prompts are rendered by the run's template
(:mod:`megatron_lpreg.data.template`) and left-truncated (the question's end, next
to the generation prompt, is what must survive). Files are read from local paths only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lpreg.data.template import TemplateError, encode_prompt


class DataError(ValueError):
    pass


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path} does not exist (datasets are never downloaded: give a local path)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
        return rows
    raise DataError(f"{path}: expected .jsonl or .parquet")


def get_path(row: dict, dotted: str):
    cur = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise DataError(f"row has no field {dotted!r} (keys: {sorted(row)})")
        cur = cur[part]
    return cur


@dataclass
class Example:
    prompt_ids: list[int]
    answer: str
    row: dict


def load_examples(path, tokenizer, *, prompt_key: str, answer_key: str, prompt_template: str,
                  max_prompt_tokens: int) -> list[Example]:
    """Every row of ``path`` as token ids under ``prompt_template``
    (:mod:`megatron_lpreg.data.template`) and its ground-truth answer."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no rows")
    out = []
    for i, row in enumerate(rows):
        try:
            ids = encode_prompt(tokenizer, get_path(row, prompt_key), template=prompt_template,
                                max_tokens=max_prompt_tokens)
            answer = str(get_path(row, answer_key))
        except (DataError, TemplateError) as e:
            raise DataError(f"{path} row {i}: {e}") from None
        if not ids:
            raise DataError(f"{path} row {i}: empty prompt")
        out.append(Example(ids, answer, row))
    return out


class ShuffledOrder:
    """Epoch-by-epoch permutations from ``seed + epoch``; the position is the whole state,
    so a resumed run draws exactly the prompts the uninterrupted run would have."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise DataError("empty dataset")
        self.size, self.seed = size, seed
        self.epoch, self.pos = 0, 0

    def _perm(self) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        perm = self._perm()
        while len(out) < k:
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                perm = self._perm()
            take = min(k - len(out), self.size - self.pos)
            out += perm[self.pos : self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise DataError(f"data order state is for {state['size']} rows / seed {state['seed']}, "
                            f"this run has {self.size} / {self.seed}")
        self.epoch, self.pos = state["epoch"], state["pos"]

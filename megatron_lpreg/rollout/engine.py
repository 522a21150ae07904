"""The rollout engine interface: prompts in, sampled responses with log-probs out.

Two engines implement it: :class:`megatron_lpreg.rollout.vllm_engine.VLLMEngine`
(vLLM's offline engine inside the trainer's job) and
:class:`megatron_lpreg.rollout.torch_engine.TorchEngine` (the Megatron model
itself; for tests and machines without vLLM).

Weights carry a version. The trainer bumps its version after every optimiser
step and passes it to :meth:`RolloutEngine.generate`; an engine whose weights
are older refuses to sample (:class:`StaleWeights`). Sampling from stale weights
is otherwise silent: the run goes on, slightly off-policy, and nobody notices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


class StaleWeights(RuntimeError):
    pass


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``temperature == 0`` is greedy; ``top_k <= 0`` and
    ``top_p == 1`` switch those filters off. Log-probs are those of the distribution
    sampled from: tempered, then filtered and renormalised (vLLM's
    ``processed_logprobs``). The trainer recomputes them under the temperature
    alone, so with the filters on the two differ by design."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n={self.n} and max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")


@dataclass
class RolloutBatch:
    """Samples in prompt-major order: the ``n`` samples of prompt ``p`` are contiguous.

    responses[i]: generated token ids (the stop token included when one ended it);
    logprobs[i]: the sampling log-prob of each of them (fp32 values);
    finish_reasons[i]: ``"stop"`` or ``"length"``.
    """

    prompt_index: list[int]
    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    weights_version: int
    timing: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.responses)


class RolloutEngine(ABC):
    weights_version: int = -1
    progress: bool = False  # show a progress bar while generating (engines that have one)

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, expected_version: int
    ) -> RolloutBatch:
        """Sample ``sampling.n`` responses per prompt. Every rank of the trainer
        calls it with the same arguments and gets the same batch."""
        if self.weights_version != expected_version:
            raise StaleWeights(
                f"rollout engine holds weights version {self.weights_version}, the trainer is at "
                f"{expected_version}: sync the weights before generating"
            )
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        batch = self._generate([list(p) for p in prompts], sampling)
        batch.weights_version = self.weights_version
        return batch

    @abstractmethod
    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> RolloutBatch: ...

    @property
    def shares_trainer_weights(self) -> bool:
        """True when the engine samples from the trainer's own parameters (no copy to sync)."""
        return False

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights: ``(hf_name, full tensor)`` pairs, streamed."""
        raise NotImplementedError

    def local_params(self, *, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor] | None:
        """The engine's own parameters on this rank by HF-style name (its TP shard), for
        direct in-place copies, or None when they do not correspond to the trainer's
        TP rank ``tp_rank`` of ``tp_size`` (then only :meth:`load_weights` is used)."""
        return None

    def weights_updated(self) -> None:
        """Called after every sync (direct copies and/or :meth:`load_weights`): drop
        whatever was computed with the old weights."""
        return None

    def set_version(self, version: int) -> None:
        self.weights_version = version

    def sleep(self) -> None:
        """Free the engine's memory while the trainer runs (GPU); no-op by default. An
        engine that discards its weights sets ``weights_version`` to -1, so the trainer
        syncs before it samples again."""
        return None

    def wake_up(self, what: str = "all") -> None:
        """Undo :meth:`sleep` for ``what``: ``weights`` (before a sync writes into them),
        ``kv_cache`` (after it, so the two never peak together) or ``all``."""
        return None

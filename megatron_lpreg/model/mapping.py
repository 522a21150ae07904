"""The single source of truth for HF <-> megatron-core parameter names and layouts.

Checkpoint conversion and the rollout weight sync both read this table. Names on
the megatron side are those of the *full* (TP=1, single-stage) model with the
local layer spec; ``decoder.layers.{i}`` uses the global layer number. The
Transformer Engine spec fuses the two pre-norms into the following linears; see
:data:`TE_RENAMES`. Sharding over TP ranks is :mod:`megatron_lpreg.tp_layout`'s job.

Three kinds of rule:

* a plain string: one HF tensor, same layout;
* :class:`FusedQKV`: megatron's ``linear_qkv`` holds, for each key/value group,
  that group's query heads, then its key head, then its value head;
* :class:`FusedGateUp`: megatron's ``linear_fc1`` is ``[gate; up]``.

Embedding and output rows are padded to the padded vocabulary with zeros on the
way in and the padding is dropped on the way out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from megatron_lpreg.model.hf_config import ModelSpec


@dataclass(frozen=True)
class FusedQKV:
    q: str
    k: str
    v: str


@dataclass(frozen=True)
class FusedGateUp:
    gate: str
    up: str


Rule = str | FusedQKV | FusedGateUp

# local-spec name -> Transformer Engine spec name (the norm lives inside the linear)
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _attn(part: str) -> str:
    return "model.layers.{i}.self_attn." + part


def layer_rules(spec: ModelSpec) -> dict[str, Rule]:
    """Rules for one decoder layer: megatron name under ``decoder.layers.{i}.`` -> rule."""
    rules: dict[str, Rule] = {
        "input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
        "self_attention.linear_qkv.weight": FusedQKV(
            _attn("q_proj.weight"), _attn("k_proj.weight"), _attn("v_proj.weight")
        ),
        "self_attention.linear_proj.weight": _attn("o_proj.weight"),
        "pre_mlp_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "mlp.linear_fc1.weight": FusedGateUp(
            "model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"
        ),
        "mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
    }
    if spec.qkv_bias:
        rules["self_attention.linear_qkv.bias"] = FusedQKV(
            _attn("q_proj.bias"), _attn("k_proj.bias"), _attn("v_proj.bias")
        )
    if spec.qk_norm:
        rules["self_attention.q_layernorm.weight"] = _attn("q_norm.weight")
        rules["self_attention.k_layernorm.weight"] = _attn("k_norm.weight")
    return rules


def global_rules(spec: ModelSpec) -> dict[str, Rule]:
    rules: dict[str, Rule] = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
    }
    if not spec.tie_word_embeddings:
        rules["output_layer.weight"] = "lm_head.weight"
    return rules


def all_rules(spec: ModelSpec) -> dict[str, Rule]:
    """Every megatron parameter of the full model -> its rule, layers expanded."""
    rules = dict(global_rules(spec))
    for i in range(spec.num_layers):
        for name, rule in layer_rules(spec).items():
            rules[f"decoder.layers.{i}.{name}"] = _fill(rule, i)
    return rules


def _fill(rule: Rule, i: int) -> Rule:
    if isinstance(rule, str):
        return rule.format(i=i)
    if isinstance(rule, FusedQKV):
        return FusedQKV(rule.q.format(i=i), rule.k.format(i=i), rule.v.format(i=i))
    return FusedGateUp(rule.gate.format(i=i), rule.up.format(i=i))


def hf_names(rule: Rule) -> tuple[str, ...]:
    if isinstance(rule, str):
        return (rule,)
    if isinstance(rule, FusedQKV):
        return (rule.q, rule.k, rule.v)
    return (rule.gate, rule.up)


# ---------------------------------------------------------------------------
# the layout transforms


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """q ``[heads*hd, ...]``, k/v ``[groups*hd, ...]`` -> ``[groups*(heads/groups + 2)*hd, ...]``."""
    g, hd = spec.num_query_groups, spec.head_dim
    per = spec.num_attention_heads // g
    rest = q.shape[1:]
    parts = [q.reshape(g, per * hd, *rest), k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)]
    return torch.cat(parts, dim=1).reshape(g * (per + 2) * hd, *rest)


def split_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hd = spec.num_query_groups, spec.head_dim
    per = spec.num_attention_heads // g
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(g, (per + 2) * hd, *rest).split([per * hd, hd, hd], dim=1)
    return q.reshape(g * per * hd, *rest), k.reshape(g * hd, *rest), v.reshape(g * hd, *rest)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def pad_vocab_rows(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] > padded:
        raise ValueError(f"vocabulary rows {t.shape[0]} exceed the padded size {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


# ---------------------------------------------------------------------------
# whole-tensor conversion, one megatron parameter at a time


def to_megatron(
    spec: ModelSpec, name: str, rule: Rule, get: Callable[[str], torch.Tensor], padded_vocab: int
) -> torch.Tensor:
    """The full megatron tensor ``name`` built from HF tensors fetched by ``get``."""
    if isinstance(rule, FusedQKV):
        t = fuse_qkv(get(rule.q), get(rule.k), get(rule.v), spec)
    elif isinstance(rule, FusedGateUp):
        t = fuse_gate_up(get(rule.gate), get(rule.up))
    else:
        t = get(rule)
    if name in VOCAB_ROWS:
        t = pad_vocab_rows(t, padded_vocab)
    return t


def to_hf(spec: ModelSpec, name: str, rule: Rule, full: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs held by the full megatron tensor ``name``."""
    if name in VOCAB_ROWS:
        full = full[: spec.vocab_size]
    if isinstance(rule, FusedQKV):
        yield from zip((rule.q, rule.k, rule.v), split_qkv(full, spec), strict=True)
    elif isinstance(rule, FusedGateUp):
        yield from zip((rule.gate, rule.up), split_gate_up(full), strict=True)
    else:
        yield rule, full


# ---------------------------------------------------------------------------
# shapes implied by the config (checked against checkpoints before reading data)


def hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the mapping reads -> the shape the config implies."""
    h, hd, ffn = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    q, kv = spec.num_attention_heads * hd, spec.num_query_groups * hd
    per_layer = {
        "model.layers.{i}.input_layernorm.weight": (h,),
        _attn("q_proj.weight"): (q, h),
        _attn("k_proj.weight"): (kv, h),
        _attn("v_proj.weight"): (kv, h),
        _attn("o_proj.weight"): (h, q),
        "model.layers.{i}.post_attention_layernorm.weight": (h,),
        "model.layers.{i}.mlp.gate_proj.weight": (ffn, h),
        "model.layers.{i}.mlp.up_proj.weight": (ffn, h),
        "model.layers.{i}.mlp.down_proj.weight": (h, ffn),
    }
    if spec.qkv_bias:
        per_layer.update({_attn("q_proj.bias"): (q,), _attn("k_proj.bias"): (kv,), _attn("v_proj.bias"): (kv,)})
    if spec.qk_norm:
        per_layer.update({_attn("q_norm.weight"): (hd,), _attn("k_norm.weight"): (hd,)})
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        shapes.update({k.format(i=i): v for k, v in per_layer.items()})
    return shapes


def megatron_shape(name: str, rule: Rule, shapes: dict, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the full megatron tensor ``name`` (after fusion and vocab padding),
    from ``shapes = hf_shapes(spec)``."""
    if isinstance(rule, FusedQKV):
        parts = [shapes[rule.q], shapes[rule.k], shapes[rule.v]]
        shape = (sum(p[0] for p in parts), *parts[0][1:])
    elif isinstance(rule, FusedGateUp):
        shape = (2 * shapes[rule.gate][0], *shapes[rule.gate][1:])
    else:
        shape = shapes[rule]
    if name in VOCAB_ROWS:
        shape = (padded_vocab, *shape[1:])
    return shape

"""Dense float64 single-process transcription of the reference's construction.

Independent of megatron_lpreg.ops: full vocabulary rows, plain softmax /
log_softmax, the proxy built the way the reference builds it (filtered logits
set to -1e4, or to the row minimum for minp_soft, then renormalised).
"""

from __future__ import annotations

import torch


def dense_stats(logits, target, *, proxy="minp", threshold=0.02, temperature=1.0, vocab_size=None,
                keep=None):
    """logits [T, V'] any float dtype, target [T]. Returns float64 tensors [T]
    (log-prob, entropy, proxy log-prob, in-proxy). ``keep`` [T, V] bool overrides
    the kept set (for exact ties, see :func:`logit_space_keep`)."""
    z = logits.double()
    if vocab_size is not None:
        z = z[:, :vocab_size]
    x = z / temperature
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    # 0 * log 0 = 0, written so that no NaN reaches the gradient either
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    lp_y = logp.gather(1, target[:, None]).squeeze(1)

    # the kept set is chosen on the untempered distribution
    p_raw = torch.softmax(z, dim=-1)
    if keep is not None:
        keep = keep[:, : z.shape[1]]
    elif proxy in ("minp", "minp_soft"):
        keep = p_raw >= threshold * p_raw.max(dim=-1, keepdim=True).values
    elif proxy == "fixed":
        keep = p_raw >= threshold
    else:
        raise ValueError(proxy)
    if proxy == "minp_soft":
        filled = z.min(dim=-1, keepdim=True).values.expand_as(z)
    else:
        filled = torch.full_like(z, -1e4)
    proxy_logits = torch.where(keep, z, filled) / temperature
    proxy_lp = torch.log_softmax(proxy_logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    in_proxy = keep.gather(1, target[:, None]).squeeze(1)
    return lp_y, entropy, proxy_lp, in_proxy


def logit_space_keep(logits, *, threshold, vocab_size=None):
    """minp kept set decided in logit space (z >= max z + log kappa), as the op does."""
    z = logits.float()
    if vocab_size is not None:
        z = z[:, :vocab_size]
    import math

    return (z - z.max(-1, keepdim=True).values) >= math.log(threshold)

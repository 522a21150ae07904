"""The GPU subset (``bench/gpu_check.sh`` runs it first): the op and the fused output on
CUDA tensors, both backends, against the dense float64 reference; a TP=1 megatron model
on the GPU against HF transformers' logits, then a backward through our op. Skipped
without CUDA; everything here also has a CPU counterpart that CI runs."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.ops import vocab_parallel as vp
from tests.ops.dense_reference import dense_stats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def no_tf32():
    # TF32 matmuls would put the HF comparison at 1e-3, not the fp32 precision asserted here
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _case(rows=96, cols=1024, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g) * 3
    z[:, vocab:] = 80.0  # padding must not leak
    t = torch.randint(0, vocab, (rows,), generator=g)
    return z, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proxy,thr", [("minp", 0.02), ("minp_soft", 0.02), ("fixed", 1e-3)])
def test_cuda_token_stats_match_dense(backend, proxy, thr):
    z, t = _case()
    st = vp.token_stats(z.cuda(), t.cuda(), proxy=proxy, proxy_threshold=thr, temperature=0.8, vocab_size=1000,
                        backend=backend, chunk_tokens=40)
    lp, h, px, inside = dense_stats(z, t, proxy=proxy, threshold=thr, temperature=0.8, vocab_size=1000)
    torch.testing.assert_close(st.logprob.cpu().double(), lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.entropy.cpu().double(), h, rtol=1e-5, atol=1e-5)
    assert torch.equal(st.in_proxy.cpu(), inside)
    keep = inside | torch.tensor(proxy == "minp_soft")
    torch.testing.assert_close(st.proxy_logprob.cpu().double()[keep], px[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_logprob_gradients_match_dense(backend):
    z, t = _case(seed=1)
    w = torch.randn(len(t), generator=torch.Generator().manual_seed(2))
    leaf = z.cuda().requires_grad_(True)
    lp, h = vp.vocab_parallel_logprob(leaf, t.cuda(), vocab_size=1000, with_entropy=True, backend=backend)
    ((lp * w.cuda()).sum() + h.sum()).backward()
    ref = z.double().requires_grad_(True)
    logp = torch.log_softmax(ref[:, :1000], -1)
    ent = -(logp.exp() * logp).sum(-1)
    ((logp.gather(1, t[:, None]).squeeze(1) * w.double()).sum() + ent.sum()).backward()
    torch.testing.assert_close(leaf.grad.cpu().double(), ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_fused_output_matches_unfused(backend):
    from megatron_lpreg.ops.fused_output import fused_logprob

    g = torch.Generator().manual_seed(3)
    hidden = (torch.randn(80, 64, generator=g)).cuda()
    weight = (torch.randn(1024, 64, generator=g) / 8).cuda()
    target = torch.randint(0, 1000, (80,), generator=g).cuda()
    grads = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            lp, ent = fused_logprob(h, w, target, vocab_size=1000, with_entropy=True, chunk_tokens=24,
                                    backend=backend)
        else:
            lp, ent = vp.vocab_parallel_logprob(h @ w.t(), target, vocab_size=1000, with_entropy=True,
                                                backend=backend)
        (lp.sum() + 0.5 * ent.sum()).backward()
        grads.append((lp.detach(), ent.detach(), h.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _megatron_on_gpu(cfg: dict, state: dict, tokens: torch.Tensor):
    """Rank 0 of a TP=1 job on the GPU: logits of the HF weights, and the parameter
    gradients' finiteness after a backward through the op."""
    from megatron.core import tensor_parallel

    from megatron_lpreg.model.builder import build_gpt, load_hf_weights
    from megatron_lpreg.model.hf_config import spec_from_hf_config

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = spec_from_hf_config(cfg)
    model = build_gpt(spec)
    load_hf_weights(model, spec, state.__getitem__)
    model.cuda()
    tok = tokens.cuda()
    pos = torch.arange(tok.shape[1], device="cuda").unsqueeze(0).expand_as(tok)
    logits = model(tok, pos, None)  # [b, s, V]
    lp = vp.vocab_parallel_logprob(logits[:, :-1], tok[:, 1:], vocab_size=spec.vocab_size)
    lp.sum().backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    n_grads = sum(p.grad is not None for p in model.parameters())
    return logits[..., : spec.vocab_size].detach().cpu(), finite, n_grads


def test_cuda_megatron_tp1_matches_hf_and_trains():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (bench/gpu_check.sh --wheels)")
    from tests.distributed import Layout, run_ranks
    from tests.model.test_parity import _hf_configs, _hf_model

    cfg = _hf_configs()["qwen3"]
    hf = _hf_model(cfg)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    (logits, finite, n_grads), = run_ranks(_megatron_on_gpu, Layout(tp=1), hf.config.to_dict(),
                                           {k: v.clone() for k, v in hf.state_dict().items()}, tokens)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert finite and n_grads > 0

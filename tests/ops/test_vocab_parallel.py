"""The vocab-parallel Lp-Reg op against a dense float64 single-process reference.

Every case is built deterministically by ``_cases()`` in both the test process and
the ranks. Each TP size runs all cases in one spawn (starting ranks costs seconds);
the tests then check the gathered per-rank results case by case.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from megatron_lpreg.ops import vocab_parallel as vp
from tests.distributed import Layout, run_ranks
from tests.host_syncs import HostSyncs
from tests.ops.dense_reference import dense_stats, logit_space_keep

PADDED = 1024  # divisible by 1, 2 and 4
FP32 = dict(rtol=1e-6, atol=1e-6)
# several collective rounds and several blocks per round in every case
CHUNK_TOKENS, BLOCK_ELEMENTS = 20, 3000


def _cases() -> dict[str, dict]:
    """name -> dict(logits [T, PADDED] fp32, target [T], vocab, proxy, thr, temp)."""
    g = torch.Generator().manual_seed(0)
    cases = {}

    def add(name, logits, target, vocab=PADDED, proxy="minp", thr=0.02, temp=1.0):
        cases[name] = dict(logits=logits, target=target, vocab=vocab, proxy=proxy, thr=thr, temp=temp)

    def sampled(z, vocab):
        """Targets drawn from the distribution (most land in the proxy) plus uniform ones."""
        t = torch.multinomial(torch.softmax(z[:, :vocab].double(), -1), 1, generator=g).squeeze(1)
        t[::4] = torch.randint(0, vocab, (len(t[::4]),), generator=g)
        return t

    for proxy, thr in [("minp", 0.02), ("minp_soft", 0.02), ("fixed", 1e-3)]:
        for temp in (1.0, 0.7):
            z = torch.randn(48, PADDED, generator=g) * 3
            # odd true vocabulary: 1000 of 1024 columns; padding holds huge values
            # that would dominate every statistic if they leaked in.
            z[:, 1000:] = 80.0
            add(f"{proxy}-T{temp}", z, sampled(z, 1000), vocab=1000, proxy=proxy, thr=thr, temp=temp)

    # a tie exactly at the threshold (logit-space) is kept; kappa = 1 keeps only the maxima
    z = torch.randn(8, PADDED, generator=g)
    at = torch.tensor(math.log(0.25), dtype=torch.float32)
    below = torch.nextafter(at, torch.tensor(-math.inf))  # one fp32 step under the threshold
    z[:, :6] = torch.stack([torch.tensor(0.0), at, at, torch.tensor(-3.0), torch.tensor(0.0), below])
    z[:, 6:] = torch.clamp(z[:, 6:], max=-2.0)
    add("tie-at-threshold", z, torch.tensor([1, 2, 3, 0, 1, 5, 3, 4]), thr=0.25)
    add("kappa-one", z, torch.tensor([0, 4, 1, 0, 4, 3, 0, 4]), thr=1.0)

    add("all-equal", torch.full((6, PADDED), 1.5), torch.tensor([0, 1, 511, 512, 1023, 7]))
    for proxy in ("minp", "minp_soft"):
        zd = torch.zeros(6, PADDED)
        zd[:, 700] = 100.0  # owned by rank 2 of 4, rank 1 of 2
        add(f"dominant-{proxy}", zd, torch.tensor([700, 3, 700, 1000, 256, 700]), proxy=proxy)
    zl = torch.randn(16, PADDED, generator=g) * 4 + 5e4
    add("large-logits", zl, sampled(zl, PADDED))
    zn = torch.randn(16, PADDED, generator=g) * 2
    zn[:, 300:600] = -math.inf  # masked logits are legal; they must not turn into NaN
    add("neg-inf-logits", zn, sampled(zn, PADDED) % 300)
    # the fixed proxy above T = 1 (its untempered normaliser takes a column of its own)
    zt = torch.randn(48, PADDED, generator=g) * 3
    zt[:, 1000:] = 80.0
    add("fixed-T1.3", zt, sampled(zt, 1000), vocab=1000, proxy="fixed", thr=1e-3, temp=1.3)
    return cases


def _grad_weights(n: int, case_name: str):
    g = torch.Generator().manual_seed(zlib.crc32(case_name.encode()))
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def _run_case(c, rank, tp, group, dtype=torch.float32):
    """This rank's view of one case: forward stats, autograd log-prob/entropy grads."""
    width = PADDED // tp
    shard = c["logits"][:, rank * width : (rank + 1) * width].to(dtype).contiguous()
    before = shard.clone()
    kw = dict(temperature=c["temp"], tp_group=group, vocab_size=c["vocab"], chunk_tokens=CHUNK_TOKENS, block_elements=BLOCK_ELEMENTS)
    st = vp.token_stats(shard, c["target"], proxy=c["proxy"], proxy_threshold=c["thr"], **kw)

    leaf = shard.clone().requires_grad_(True)
    lp, h = vp.vocab_parallel_logprob(leaf, c["target"], with_entropy=True, **kw)
    w_lp, w_h = _grad_weights(len(c["target"]), c["name"])
    (lp.double() @ w_lp + h.double() @ w_h).backward()
    lp_only = vp.vocab_parallel_logprob(shard, c["target"], **kw)
    out = dict(st=st, lp=lp.detach(), h=h.detach(), lp_only=lp_only, grad=leaf.grad,
               unchanged=torch.equal(before, shard))
    if c["proxy"] == "minp" and c["name"] != "neg-inf-logits":
        kl_leaf = shard.clone().requires_grad_(True)
        kl = vp.minp_proxy_kl(kl_leaf, kappa=c["thr"], **kw)
        kl.double().sum().backward()
        out.update(kl=kl.detach(), kl_grad=kl_leaf.grad)
    return out


def _rank_all_cases(dtype_name="float32"):
    """Runs on every rank: all cases, plus the collectives each op issued."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    calls = []
    real = dist.all_reduce

    def counting(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(("MAX" if op == dist.ReduceOp.MAX else "SUM", tuple(t.shape)))
        return real(t, op=op, group=group, async_op=async_op)

    def forbidden(*a, **k):
        raise AssertionError("the op must not gather the vocabulary")

    vp.dist.all_reduce = counting
    vp.dist.all_gather = vp.dist.all_gather_into_tensor = forbidden
    results, collectives = {}, {}
    for name, c in _cases().items():
        c["name"] = name
        results[name] = _run_case(c, rank, tp, group, getattr(torch, dtype_name))
        # collectives of one token_stats call, measured on its own
        calls.clear()
        shard = c["logits"][:, rank * (PADDED // tp) : (rank + 1) * (PADDED // tp)].contiguous()
        vp.token_stats(shard, c["target"], proxy=c["proxy"], proxy_threshold=c["thr"],
                       temperature=c["temp"], tp_group=group, vocab_size=c["vocab"], chunk_tokens=CHUNK_TOKENS, block_elements=BLOCK_ELEMENTS)
        collectives[name] = list(calls)
    return results, collectives


def _assemble(per_rank: list[dict], name: str) -> dict:
    r0 = per_rank[0][name]
    out = {k: r0[k] for k in ("st", "lp", "h", "lp_only")}
    out["grad"] = torch.cat([r[name]["grad"] for r in per_rank], dim=1)
    out["unchanged"] = all(r[name]["unchanged"] for r in per_rank)
    out["per_rank_st"] = [r[name]["st"] for r in per_rank]
    if "kl" in r0:
        out["kl"] = r0["kl"]
        out["kl_grad"] = torch.cat([r[name]["kl_grad"] for r in per_rank], dim=1)
    return out


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda tp: f"tp{tp}")
def tp_run(request):
    per_rank = run_ranks(_rank_all_cases, Layout(tp=request.param))
    return request.param, [r[0] for r in per_rank], per_rank[0][1]


CASES = _cases()


def _dense_grads(c, name):
    z = c["logits"].double().clone().requires_grad_(True)
    lp, h, _, _ = dense_stats(z, c["target"], proxy="minp", threshold=0.5, temperature=c["temp"], vocab_size=c["vocab"])
    w_lp, w_h = _grad_weights(len(c["target"]), name)
    (lp @ w_lp + h @ w_h).backward()
    return z.grad


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_reference(tp_run, name):
    tp, per_rank, _ = tp_run
    c = CASES[name]
    got = _assemble(per_rank, name)
    keep = None
    if name in ("tie-at-threshold", "kappa-one"):
        # exact ties are defined in logit space (z >= max z + log kappa), where
        # they are exact; the probability-space test is off by rounding there.
        keep = logit_space_keep(c["logits"], threshold=c["thr"])
    lp, h, px, in_px = dense_stats(c["logits"], c["target"], proxy=c["proxy"], threshold=c["thr"],
                                   temperature=c["temp"], vocab_size=c["vocab"], keep=keep)
    if keep is not None:
        assert in_px.tolist() == ([True, True, False, True, True, False, False, True] if name != "kappa-one"
                                  else [True, True, False, True, True, False, True, True])
    st = got["st"]
    torch.testing.assert_close(st.logprob.double(), lp, **FP32)
    torch.testing.assert_close(st.entropy.double(), h, **FP32)
    assert st.in_proxy.tolist() == in_px.tolist()
    if c["proxy"] == "minp_soft":
        torch.testing.assert_close(st.proxy_logprob.double(), px, **FP32)  # defined everywhere
    else:
        kept = in_px
        torch.testing.assert_close(st.proxy_logprob.double()[kept], px[kept], rtol=1e-5, atol=1e-5)
        # outside the proxy: finite, never above the log-prob (cannot pass the Lp-Reg gate)
        out = ~kept
        assert torch.isfinite(st.proxy_logprob[out]).all()
        assert (st.proxy_logprob[out] <= st.logprob[out]).all()
        assert (st.proxy_logprob[out] <= vp.PROXY_SENTINEL).all()
    # every rank returns the same per-token statistics
    for other in got["per_rank_st"][1:]:
        for field in ("logprob", "entropy", "proxy_logprob", "in_proxy"):
            assert torch.equal(getattr(other, field), getattr(st, field))
    # the autograd pass agrees with the forward-only pass and the reference
    torch.testing.assert_close(got["lp"].double(), lp, **FP32)
    torch.testing.assert_close(got["h"].double(), h, **FP32)
    torch.testing.assert_close(got["lp_only"], got["lp"], rtol=0, atol=0)
    assert got["unchanged"], "the caller's logits were modified"


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_dense_reference(tp_run, name):
    _, per_rank, _ = tp_run
    c = CASES[name]
    got = _assemble(per_rank, name)
    ref = _dense_grads(c, name)
    grad = got["grad"]
    assert torch.isfinite(grad).all()
    assert (grad[:, c["vocab"]:] == 0).all(), "padded columns must get zero gradient"
    torch.testing.assert_close(grad[:, : c["vocab"]].double(), ref[:, : c["vocab"]], **FP32)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["proxy"] == "minp" and n != "neg-inf-logits"])
def test_exact_proxy_kl(tp_run, name):
    """KL(proxy || pi) = log S - log S_K, against a dense sum and dense autograd."""
    _, per_rank, _ = tp_run
    c = CASES[name]
    got = _assemble(per_rank, name)
    z = c["logits"][:, : c["vocab"]].double().clone().requires_grad_(True)
    x = z / c["temp"]
    keep = logit_space_keep(c["logits"], threshold=c["thr"], vocab_size=c["vocab"])
    logp = torch.log_softmax(x, -1)
    logq = torch.log_softmax(x.masked_fill(~keep, -math.inf), -1)
    q = logq.exp()
    kl = (q * torch.where(keep, logq - logp, torch.zeros_like(logp))).sum(-1)
    kl.sum().backward()
    torch.testing.assert_close(got["kl"].double(), kl.detach(), **FP32)
    torch.testing.assert_close(got["kl_grad"][:, : c["vocab"]].double(), z.grad, **FP32)
    assert (got["kl"] >= 0).all()


@pytest.mark.parametrize("name", ["minp-T1.0", "minp_soft-T0.7", "fixed-T1.0", "fixed-T0.7"])
def test_collectives_per_chunk(tp_run, name):
    """min-p: exactly one all-reduce-MAX and one all-reduce-SUM per chunk; fixed: one more SUM."""
    tp, _, collectives = tp_run
    c = CASES[name]
    calls = collectives[name]
    if tp == 1:
        assert calls == []  # the TP=1 group is skipped entirely
        return
    n_chunks = math.ceil(len(c["target"]) / CHUNK_TOKENS)
    per_chunk = ["MAX", "SUM"] + (["SUM"] if c["proxy"] == "fixed" else [])
    assert [op for op, _ in calls] == per_chunk * n_chunks
    # what crosses the wire is a few numbers per token, never a vocabulary row
    assert all(shape[-1] <= 6 or len(shape) == 1 for _, shape in calls)


def test_bf16_input_matches_reference_of_rounded_logits():
    c = dict(CASES["minp-T0.7"])
    c["name"] = "minp-T0.7"
    logits_bf16 = c["logits"].to(torch.bfloat16)
    out = _run_case(c, 0, 1, None, torch.bfloat16)
    lp, h, px, in_px = dense_stats(logits_bf16, c["target"], proxy="minp", threshold=c["thr"],
                                   temperature=c["temp"], vocab_size=c["vocab"])
    # arithmetic is fp32 on exactly-representable inputs: fp32 accuracy
    torch.testing.assert_close(out["st"].logprob.double(), lp, **FP32)
    torch.testing.assert_close(out["st"].entropy.double(), h, **FP32)
    assert out["grad"].dtype == torch.bfloat16
    cc = dict(c, logits=logits_bf16.float())
    ref = _dense_grads(cc, "minp-T0.7")
    torch.testing.assert_close(out["grad"][:, :1000].double(), ref[:, :1000], rtol=1e-2, atol=1e-2)
    assert out["unchanged"]


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 37, (6,), generator=g)

    def f(z):
        return vp.vocab_parallel_logprob(z, t, with_entropy=True, temperature=0.8, vocab_size=37, chunk_tokens=4, block_elements=80)

    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradcheck(lambda z: vp.minp_proxy_kl(z, kappa=0.3, temperature=0.9), (z,))


def test_leading_dimensions_are_kept():
    z = torch.randn(2, 3, 50)
    t = torch.randint(0, 50, (2, 3))
    st = vp.token_stats(z, t)
    assert st.logprob.shape == st.in_proxy.shape == (2, 3)
    flat = vp.token_stats(z.reshape(6, 50), t.reshape(6))
    assert torch.equal(st.logprob.reshape(6), flat.logprob)


@pytest.mark.parametrize(
    "kwargs, target, match",
    [
        (dict(), torch.tensor([0, 50]), "outside the true vocabulary"),
        (dict(vocab_size=40), torch.tensor([0, 45]), "outside the true vocabulary"),
        (dict(), torch.tensor([-1, 3]), "outside the true vocabulary"),
        (dict(proxy_threshold=0.0), torch.tensor([0, 1]), r"proxy_threshold must be in \(0, 1\]"),
        (dict(proxy_threshold=1.5), torch.tensor([0, 1]), r"proxy_threshold must be in \(0, 1\]"),
        (dict(proxy="topk"), torch.tensor([0, 1]), "is not one of"),
        (dict(temperature=0.0), torch.tensor([0, 1]), "temperature"),
        (dict(vocab_size=51), torch.tensor([0, 1]), "vocab_size=51"),
        (dict(), torch.tensor([0, 1, 2]), "target shape"),
    ],
)
def test_bad_input_is_rejected(kwargs, target, match):
    z = torch.randn(2, 50)
    with pytest.raises((ValueError, TypeError), match=match):
        vp.token_stats(z, target, **kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_are_rejected(bad):
    z = torch.randn(3, 50)
    z[1, 7] = bad
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        vp.token_stats(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        vp.vocab_parallel_logprob(z.requires_grad_(True), torch.tensor([0, 1, 2]))


def _nan_on_one_rank():
    """NaN on one rank only: every rank must raise, none may hang in a collective."""
    from megatron.core import parallel_state as ps

    rank = ps.get_tensor_model_parallel_rank()
    z = torch.randn(4, 25)
    if rank == 1:
        z[2, 3] = math.nan
    try:
        vp.token_stats(z, torch.tensor([0, 1, 2, 3]), tp_group=ps.get_tensor_model_parallel_group())
    except ValueError as e:
        return str(e)
    return None


def test_nan_on_one_rank_raises_on_every_rank():
    msgs = run_ranks(_nan_on_one_rank, Layout(tp=2), timeout=120)
    assert all(m is not None and "NaN" in m for m in msgs)


def test_fast_kept_sum_equals_exact_sum_with_values_planted_at_the_threshold():
    """The threshold-on-exp shortcut must agree with the exact d >= thr test,
    including elements one fp32 step either side of the threshold."""
    g = torch.Generator().manual_seed(11)
    thr = torch.tensor(math.log(0.02), dtype=torch.float32)
    d = (-torch.rand(1, 500, generator=g) * 10).repeat(63, 1)  # identical rows...
    d[:, 0] = 0.0
    up, down = torch.nextafter(thr, torch.tensor(0.0)), torch.nextafter(thr, torch.tensor(-math.inf))
    d[::3, 5], d[1::3, 5], d[2::3, 5] = thr, up, down
    e = torch.exp(d)
    fast, band = vp._kept_sum(e.clone(), float(thr))
    assert bool(band.all())  # the planted values lie in the band: settled exactly, from d
    shard = vp._make_shard(d, None, None, None, None)  # d as logits with max 0 at T = 1: d again
    vp._settle(d, 0, shard, 1.0, torch.zeros(63), s_k=fast, band=band, thr=float(thr))
    exact = vp._kept_sum_exact(d, e.clone(), float(thr))
    torch.testing.assert_close(fast, exact, rtol=1e-6, atol=0)
    # ...but for the planted value, which is kept at and above the threshold only
    torch.testing.assert_close(fast[::3] - fast[2::3], e[::3, 5], rtol=1e-4, atol=0)
    torch.testing.assert_close(fast[1::3] - fast[2::3], e[1::3, 5], rtol=1e-4, atol=0)


@pytest.mark.parametrize("proxy", ["minp", "minp_soft", "fixed"])
def test_host_syncs_per_chunk_not_per_block(proxy):
    """The torch path settles its rare rows (-inf logits, kept-set ties) once per chunk: on a
    GPU a sync per block of rows (6 rows at a 151,936 vocabulary) was ~11k syncs per 32k
    tokens. 64 rows in blocks of one row, with -inf logits and ties in many blocks."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(64, 50, generator=g)
    z[::3, 7] = -math.inf
    z[::4, 0], z[::4, 1] = 0.0, math.log(0.02)  # a tie exactly at the min-p edge
    t = torch.randint(0, 50, (64,), generator=g)

    def syncs(block_elements):
        with HostSyncs() as counter:
            vp.token_stats(z, t, proxy=proxy, proxy_threshold=0.02, block_elements=block_elements, backend="torch")
            lp, h = vp.vocab_parallel_logprob(z.clone().requires_grad_(), t, with_entropy=True,
                                              block_elements=block_elements, backend="torch")
            (lp.sum() + h.sum()).backward()
        return counter.count

    one_block, per_row = syncs(64 * 50), syncs(50)
    assert per_row == one_block <= 8, (per_row, one_block)  # target range, max check, settling: per call


def test_block_size_follows_the_device():
    assert vp.block_elements_for("cpu") == vp.DEFAULT_BLOCK_ELEMENTS == 1 << 20
    assert vp.block_elements_for(torch.device("cuda", 0)) == vp.CUDA_BLOCK_ELEMENTS
    shard = vp._make_shard(torch.zeros(4, 151_936 // 8), None, None, None, None)
    assert shard.block == 4  # all rows fit: a CPU block is 1M elements
    # otherwise the rows that fit: the block bounds the op's temporary memory
    assert vp._make_shard(torch.zeros(100, 1000), None, None, None, 3000).block == 3

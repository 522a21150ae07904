"""Every collective the package issues goes through ``megatron_lpreg/collectives.py``, the
one place that puts tensors where the group's backend needs them (NCCL refuses CPU
tensors: a host-side tensor broadcast over the pipeline group stopped AER at PP > 1).

A static scan of the package's source finds any direct ``torch.distributed`` collective;
the wrappers' device logic and their results on gloo ranks are tested beside it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from megatron_lpreg import collectives
from tests.distributed import Layout, run_ranks

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_lpreg"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "reduce", "gather", "gather_object",
    "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "send_object_list", "recv_object_list",
    "all_reduce_coalesced", "all_gather_coalesced",
}


def direct_collectives(source: str) -> list[str]:
    """``line: call`` of each torch.distributed collective called directly in ``source``
    (``dist.x(...)``, ``torch.distributed.x(...)`` or a name imported from it)."""
    tree = ast.parse(source)
    aliases, imported = {"torch.distributed"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            imported |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
            found.append(f"{node.lineno}: {ast.unparse(f)}")
        elif isinstance(f, ast.Name) and f.id in imported:
            found.append(f"{node.lineno}: {f.id}")
    return found


def test_no_collective_outside_collectives_module():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "collectives.py" and path.parent == PACKAGE:
            continue
        hits = direct_collectives(path.read_text())
        if hits:
            offenders[str(path.relative_to(PACKAGE.parent))] = hits
    assert not offenders, f"call these through megatron_lpreg.collectives instead: {offenders}"


@pytest.mark.parametrize("source", [
    "import torch.distributed as dist\ndist.broadcast(t, src=0)",
    "import torch\ntorch.distributed.all_reduce(t)",
    "from torch.distributed import all_gather_object\nall_gather_object(out, x)",
    "from torch import distributed as d\nd.barrier()",
])
def test_scan_finds_direct_calls(source):
    assert len(direct_collectives(source)) == 1


def test_scan_ignores_what_is_not_a_collective():
    assert not direct_collectives("import torch.distributed as dist\ndist.get_rank(); dist.new_group([0])\n"
                                  "collectives.broadcast(t, src=0)")


def test_backend_device(monkeypatch):
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "gloo")
    assert collectives.backend_device() == torch.device("cpu")


def test_staging_moves_only_what_is_elsewhere():
    t = torch.arange(6.0)
    assert collectives._staged(t, torch.device("cpu")) is t
    moved = collectives._staged(t, torch.device("meta"))
    assert moved.device.type == "meta" and moved is not t
    assert collectives._staged(t[::2], torch.device("cpu")).is_contiguous()


def _wrappers() -> dict:
    import torch.distributed as dist

    r, world = dist.get_rank(), dist.get_world_size()
    out = {}
    out["all_reduce"] = collectives.all_reduce(torch.tensor([float(r + 1)]), collectives.ReduceOp.MAX).item()
    out["all_reduce_f64"] = collectives.all_reduce(torch.tensor([0.5 * r], dtype=torch.float64)).item()
    out["broadcast"] = collectives.broadcast(torch.tensor([float(r)]), src=world - 1).item()
    out["all_gather"] = [p.item() for p in collectives.all_gather(torch.tensor([r * 10]))]
    out["all_gather_host"] = collectives.all_gather_host(torch.tensor([r, -r])).tolist()
    out["all_gather_object"] = collectives.all_gather_object({"rank": r})
    out["broadcast_object"] = collectives.broadcast_object(f"from {r}", src=1)
    collectives.barrier()
    return out


def test_wrappers_on_gloo_ranks():
    res = run_ranks(_wrappers, Layout(tp=1, pp=1, dp=3))
    for r in res:
        assert r["all_reduce"] == 3.0 and r["all_reduce_f64"] == 1.5 and r["broadcast"] == 2.0
        assert r["all_gather"] == [0, 10, 20] and r["all_gather_host"] == [[0, 0], [1, -1], [2, -2]]
        assert r["all_gather_object"] == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
        assert r["broadcast_object"] == "from 1"

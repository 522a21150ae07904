"""Count the calls that copy a tensor's value to the host: on a GPU each one waits for
the device (a sync), so hot loops must not make one per block or per parameter."""

from __future__ import annotations

import torch


class HostSyncs(torch.overrides.TorchFunctionMode):
    """``with HostSyncs() as c: ...`` then ``c.count``."""

    SYNCS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__float__}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.SYNCS
        return func(*args, **(kwargs or {}))

"""The ``multinode`` marker: launch cases too slow for CI's 40 minutes on two cores
(the two-node TP=2 requeue, the restart limit, the hang watchdog). ``make
test-multinode`` runs them (``LPREG_MULTINODE=1``); ``make test`` reports them skipped."""

from __future__ import annotations

import os

import pytest

MULTINODE = bool(os.environ.get("LPREG_MULTINODE"))


def pytest_collection_modifyitems(config, items):
    if MULTINODE:
        return
    skip = pytest.mark.skip(reason="make test-multinode (LPREG_MULTINODE=1): not in CI's time")
    for item in items:
        if item.get_closest_marker("multinode"):
            item.add_marker(skip)

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray for every test here: 2 CPUs, no dashboard, loopback only."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",  # loopback only
        configure_logging=False,
    )
    with warnings.catch_warnings():
        # Ray Data's DataContext sets its own deprecated fields (use_push_based_shuffle, use_polars)
        # when it is first made, and warns about them.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
        ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()

"""fxmem.distributed.sharding.per_rank: the arithmetic of DDP and FSDP2 on a timeline."""

import numpy as np
import pytest

from fxmem.distributed.sharding import per_rank
from fxmem.memory.simulation import CATEGORIES, MemoryTimeline


def _timeline():
    """Two points: the forward (parameters, optimizer state, saved activations) and the end of
    the backward (the gradients too)."""
    live = np.zeros((2, len(CATEGORIES)), dtype=np.int64)
    col = CATEGORIES.index
    live[:, col("parameters")] = 800
    live[:, col("optimizer state")] = 1600
    live[0, col("saved activations")] = 1000
    live[1, col("gradients")] = 800
    live[1, col("temporaries")] = 100
    return MemoryTimeline(("fwd", "bwd"), live, 1, np.array([3400, 4200]))


def test_fsdp2_shards_state_and_adds_the_unsharded_blocks():
    r = per_rank(_timeline(), 8, strategy="fsdp2", block_bytes=50, root_bytes=30)
    # point 0: 100 + 200 + 1000 + unsharded (2*50 + 50 + 30 = 180) = 1480; point 1: 100 + 100
    # + 200 + 100 + 180 = 680
    assert (r.peak, r.at) == (1480, "fwd")
    assert r.breakdown["parameters"] == 100 and r.breakdown["communication buffers"] == 180


def test_ddp_holds_whole_state_and_buckets_the_size_of_the_gradients():
    r = per_rank(_timeline(), 64, strategy="ddp")
    # point 0: 800 + 1600 + 1000 + 800 (buckets) = 4200; point 1: 800 + 1600 + 800 + 100 + 800
    assert (r.peak, r.at) == (4200, "fwd")
    assert r.breakdown["communication buffers"] == 800


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="strategy"):
        per_rank(_timeline(), 2, strategy="zero3")
    with pytest.raises(ValueError, match="world"):
        per_rank(_timeline(), 0, strategy="ddp")
    with pytest.raises(ValueError, match="non-negative"):
        per_rank(_timeline(), 2, strategy="fsdp2", block_bytes=-1)

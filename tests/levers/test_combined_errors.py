"""A BudgetError that combines two lever settings carries the lower floor, and its first line
names that floor (a budget over it fits), whichever setting reached it."""

import pytest
import torch

from fxmem.budget import BudgetError
from fxmem.levers.precision.casts import casts_for
from fxmem.levers.precision.fallback import combined_error
from fxmem.levers.sparse.fallback import combined_sparse_error

MiB = 2**20


def _error(floor):
    return BudgetError(f"no plan fits: the smallest feasible budget is about {floor} bytes",
                       floor=floor, holders={"parameters": floor}, unoptimized=4 * MiB)


@pytest.mark.parametrize("exact_floor, low_floor", [(2 * MiB, 3 * MiB), (3 * MiB, 2 * MiB)])
def test_the_precision_levers_error_leads_with_the_lower_floor(exact_floor, low_floor):
    casts = casts_for("cpu", torch.bfloat16, "test")
    err = combined_error(_error(exact_floor), _error(low_floor), casts)
    low = min(exact_floor, low_floor)
    assert err.floor == low
    assert str(err).splitlines()[0].endswith(f"about {low} bytes")
    assert str(max(exact_floor, low_floor)) in str(err)


@pytest.mark.parametrize("dense_floor, sparse_floor", [(2 * MiB, 3 * MiB), (3 * MiB, 2 * MiB)])
def test_the_sparse_levers_error_leads_with_the_lower_floor(dense_floor, sparse_floor):
    err = combined_sparse_error(_error(dense_floor), _error(sparse_floor), 0.05)
    low = min(dense_floor, sparse_floor)
    assert err.floor == low
    assert str(err).splitlines()[0].endswith(f"about {low} bytes")
    assert "density 0.05" in str(err) and str(max(dense_floor, sparse_floor)) in str(err)

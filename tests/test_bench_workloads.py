"""End to end on the full-size bench workloads: the eager step's predicted peak is within 5% of
the measured one (the figures in bench/results/estimate_accuracy.md come from the same code)."""

import gc

import pytest
import torch

from bench.workloads import WORKLOADS
from fxmem import Workload


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_bench_workload_prediction_within_5_percent(name):
    if name == "hf_gpt2":
        pytest.importorskip("transformers")
    workload = Workload.from_factory_result(WORKLOADS[name](), name=name)
    workload.optimizer = torch.optim.Adam(workload.model.parameters(), lr=1e-4)
    est = workload.estimate()
    measured = workload.measure(warmup=1)
    assert est.peak == pytest.approx(measured.peak, rel=0.05), est.report()
    del workload
    gc.collect()

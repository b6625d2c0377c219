"""InI step speed, grouped as one comparison: plain SGD vs the reference InI step vs the production one
(pytest-benchmark; a one-shot smoke run unless `--benchmark-enable`). Ratios and peak memory:
`python benchmarks/bench_ini_step.py`.

    pytest tests/test_bench_ini.py --benchmark-enable --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_ini_step  # noqa: E402


@pytest.fixture(scope="module")
def steps():
    return bench_ini_step.steps()


@pytest.mark.parametrize("kind", bench_ini_step.KINDS)
def test_step_speed(benchmark, steps, kind):
    benchmark.group = "ini-step (LeNet-5, batch 128)"
    if kind not in steps:  # the compiled step exists only where torch.compile finds a C++ compiler
        pytest.skip(f"no {kind} step on this machine: torch.compile needs a C++ compiler")
    step = steps[kind]
    before = [p.detach().clone() for p in step.victim.parameters()]
    benchmark(step)
    after = list(step.victim.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the step moved the victim

"""Inference latency of the deployed TorchScript graph per defense (pytest-benchmark, grouped by defense).

InI's deployed graph is the undefended one by construction (its protection is in the weights), so its latency is
the physical limit; the perturbation defenses add work after the softmax. A smoke run in the normal suite;
measure with:

    pytest tests/test_bench_inference.py --benchmark-enable --benchmark-json=artifacts/bench.json

The watermark is not part of the graph (its key would ship with it): its row is the undefended graph with the marks
applied on the host after it, as `serve --watermark-key` does. The session summary prints each defense's median
latency relative to undefended and InI's speed-up over it.
"""

from __future__ import annotations

import pytest
import torch

import models
from models.defenses import AdaptiveMisinformation, Deployed, Watermark
from models.params import defaults
from stages.deploy import defense as _defense
from stages.training import jit as _jit

ARCH, CLASSES, SHAPE, MEAN, STD = "lenet5", 10, (1, 28, 28), [0.1307], [0.3081]
DEFENSES = ["none", "ini", "reverse-sigmoid", "adaptive-misinformation", "grad2", "mad", "top1", "gate", "watermark"]
KEY = b"a benchmark key, thirty-two byte"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
RESULTS: dict[tuple[str, str, int], float] = {}  # (device, defense, batch) -> median seconds, for the summary


def deployed_graph(defense: str, device: str):
    """The graph `export` writes: images in [0, 1] -> normalise -> network -> softmax -> defense (the watermark:
    the undefended graph, then the marks on the host)."""
    torch.manual_seed(0)
    victim = models.build_model(ARCH, CLASSES, SHAPE[0], SHAPE[1], MEAN, STD)
    if defense == "watermark":
        graph = deployed_graph("none", device)
        marks = Watermark(KEY, **{**defaults(Watermark.PARAMS), "quantile": 0.0, "threshold": 0.5}).eval()
        return lambda x: marks(x, graph(x))
    if defense in ("none", "ini"):
        posterior = _defense.build("none", {}, ARCH, CLASSES, SHAPE, MEAN, STD)
    elif defense == "adaptive-misinformation":  # the misinformation net is a second network of the same size
        posterior = AdaptiveMisinformation(
            _defense.random_proxy(ARCH, CLASSES, SHAPE, MEAN, STD, 1), **defaults(AdaptiveMisinformation.PARAMS)
        )
    else:
        posterior = _defense.build(defense, _defense.parse(defense, []), ARCH, CLASSES, SHAPE, MEAN, STD)
    return _jit.script(Deployed(victim, posterior).eval().to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("defense", DEFENSES)
def test_latency(benchmark, defense, batch, device):
    benchmark.group = f"{device} batch {batch}"
    graph = deployed_graph(defense, device)
    x = torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(1)).to(device)

    def infer():
        with torch.inference_mode():
            out = graph(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    for _ in range(3):  # warm-up: TorchScript profiles and optimises on its first calls
        infer()
    probs = benchmark(infer)
    assert probs.shape == (batch, CLASSES)
    assert torch.allclose(probs.sum(1), torch.ones(batch, device=device), atol=1e-4)
    if benchmark.stats is not None:
        RESULTS[(device, defense, batch)] = benchmark.stats.stats.median

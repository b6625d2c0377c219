"""Defense speed, grouped by defense (pytest-benchmark; a smoke run unless `--benchmark-enable`), and MAD
batched against the straightforward per-sample loop of its authors: same maths, same outputs, compared side by
side in group `mad` (the table's parenthesised ratios are the speed-up).

    pytest tests/test_bench_defenses.py --benchmark-enable --benchmark-columns=min,median,rounds
"""

import pytest
import torch

from models.defenses import DEFENSES, MAD, AdaptiveMisinformation, Watermark
from models.params import defaults
from stages.deploy import defense as _defense

SHAPE, K, BATCH = (1, 28, 28), 10, 256


def _inputs(n: int = BATCH):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *SHAPE, generator=g), torch.softmax(torch.randn(n, K, generator=g) * 3, 1)


def _defense_for(name: str) -> torch.nn.Module:
    if name == "adaptive-misinformation":
        return AdaptiveMisinformation(
            _defense.random_proxy("lenet5", K, SHAPE, [0.5], [0.25], 1), **defaults(AdaptiveMisinformation.PARAMS)
        )
    if name == "watermark":  # a fixed key, the OOD threshold given: the host-side HMAC per image is what it costs
        return Watermark(b"benchmark key, 32 bytes, fixed..", **_defense.parse(name, ["quantile=0", "threshold=0.5"]))
    return _defense.build(name, _defense.parse(name, []), "lenet5", K, SHAPE, [0.5], [0.25])


def class_gradients(proxy, x1: torch.Tensor) -> torch.Tensor:
    """G (K, K*(D+1)): row k = d log softmax(fc(h))_k / d[W, b] = (e_k - q) [h, 1]^T, for one image."""
    h = proxy.features(x1)[0]
    q = torch.softmax(proxy.net.fc(h[None]), 1)[0]
    hb = torch.cat([h, torch.ones(1)])
    eye = torch.eye(len(q))
    return torch.stack([torch.outer(eye[k] - q, hb).flatten() for k in range(len(q))])


def mad_per_sample(defense: MAD, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The authors' shape of MAD: one image at a time, explicit G, a Python loop over candidate targets."""
    out = []
    for i in range(len(x)):
        G = class_gradients(defense.proxy, x[i : i + 1])
        y = probs[i]
        a = G.t() @ y
        a = a / a.norm()
        k = len(y)
        c = int(y.argmax())
        eye = torch.eye(k)
        candidates = [
            eye[j] if (not defense.argmax or j == c) else (0.5 + 1e-3) * eye[c] + (0.5 - 1e-3) * eye[j]
            for j in range(k)
        ]
        best, best_objective = candidates[0], -1.0
        for candidate in candidates:
            u = G.t() @ candidate
            u = u / u.norm()
            objective = float(((u - a) ** 2).sum())
            if objective > best_objective:
                best, best_objective = candidate, objective
        alpha = min(1.0, defense.eps / float((best - y).abs().sum()))
        out.append((1 - alpha) * y + alpha * best)
    return torch.stack(out)


def test_class_gradients_are_the_autograd_gradients():
    """The closed form (e_k - q) h^T behind both implementations, checked against autograd."""
    proxy = _defense.random_proxy("lenet5", K, SHAPE, [0.5], [0.25], 0)
    x, _ = _inputs(1)
    fc = proxy.net.fc
    rows = []
    for k in range(K):
        proxy.zero_grad()
        torch.log_softmax(proxy(x), 1)[0, k].backward()
        rows.append(torch.cat([fc.weight.grad.flatten(), fc.bias.grad]))
    expected = torch.stack(rows)
    with torch.no_grad():
        G = class_gradients(proxy, x)
    d = fc.in_features
    # G rows are (e_k - q) outer [h, 1], flattened: weight part = [:, :d] of each class block, bias = last column
    blocks = G.view(K, K, d + 1)
    ours = torch.cat([blocks[:, :, :d].flatten(1), blocks[:, :, d]], 1)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["mad", "mad-argmax"])
def test_batched_mad_equals_the_per_sample_loop(name):
    defense = _defense_for(name)
    x, p = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(defense(x, p), mad_per_sample(defense, x, p), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(DEFENSES))
def test_speed_batched(benchmark, name):
    benchmark.group = name
    defense = _defense_for(name)
    x, p = _inputs()
    with torch.no_grad():
        out = benchmark(defense, x, p)
    assert out.shape == (BATCH, K)


def test_speed_mad_per_sample_loop(benchmark):
    benchmark.group = "mad"
    benchmark.extra_info["note"] = "same maths as mad, one image at a time"
    defense = _defense_for("mad")
    x, p = _inputs()
    with torch.no_grad():
        out = benchmark.pedantic(mad_per_sample, args=(defense, x, p), rounds=3, iterations=1)
    assert out.shape == (BATCH, K)

"""The watermark's operating point, measured on a victim's test split (docs/results.md, "Proving a theft"):
(1) benign cost: the share of test answers marked and the accuracy lost, for marking every answer at a base rate
against marking OOD-looking answers (top probability below the benign 1 % val quantile) at a higher rate; the
expected cost (sum of each answer's marking rate where the victim is right) does not depend on the key;
(2) stability: for each coarsening (block size, grey levels), the share of test images whose hashed image is
unchanged by a 1-2 pixel shift or small Gaussian noise, i.e. that keep their mark under a thief's variants,
and how many test images stay apart (a hash that merges them marks them all or none).

    python experiments/watermark.py artifacts/victim.h5 [--key artifacts/watermark.key]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stages, not an installed copy

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.defenses import Watermark, coarsen  # noqa: E402
from models.params import defaults  # noqa: E402
from stages.data import prepared as _data  # noqa: E402
from stages.deploy import defense as _defense  # noqa: E402
from stages.deploy import watermark_key as _keys  # noqa: E402
from stages.training import victim as _victim  # noqa: E402

SETTINGS = (  # (rate, ood_rate)
    (0.005, 0.0),
    (0.001, 0.0),
    (0.0005, 0.0),
    (0.0, 0.1),
    (0.0005, 0.1),
    (0.0005, 0.2),
    (0.0, 0.5),
)
COARSENINGS = ((1, 256), (1, 16), (2, 16), (2, 4), (4, 8), (4, 4), (7, 4), (14, 2))
STABILITY_IMAGES = 2000


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    return np.roll(x, (dy, dx), axis=(2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("victim", type=Path)
    parser.add_argument("--key", type=Path, default=_keys.DEFAULT_KEY)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net, info = _victim.load(args.victim)
    data = _data.load(info.dataset_path, splits=("test",))
    images, labels = data.splits["test"]
    x = _data.to_float(images)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(net(x[i : i + 1000]), 1) for i in range(0, len(x), 1000)])
    threshold = _defense.benign_threshold(args.victim, 0.01)
    right = (probs.argmax(1) == labels).numpy()
    top = probs.max(1).values.numpy()
    low = top < threshold
    print(f"victim {args.victim}: test accuracy {right.mean():.2%}, {len(x):,} test images")
    print(f"OOD threshold (1 % val quantile) {threshold:.4f}: {low.mean():.2%} of test answers below it")
    print()
    print("| rate | ood_rate | test answers marked | accuracy as deployed | cost (pt) | expected cost (pt) |")
    print("|---|---|---|---|---|---|")
    key = _keys.load(args.key)
    for rate, ood_rate in SETTINGS:
        d = Watermark(
            key,
            **{
                **defaults(Watermark.PARAMS),
                "rate": rate,
                "ood_rate": ood_rate,
                "quantile": 0.0,
                "threshold": threshold,
            },
        )
        with torch.no_grad():
            out = d(x, probs)
        marked = (out.argmax(1) != probs.argmax(1)).numpy()
        deployed = (out.argmax(1) == labels).numpy().mean()
        expected = (np.where(low, max(rate, ood_rate), rate) * right).mean()
        print(
            f"| {rate:g} | {ood_rate:g} | {marked.sum()} ({marked.mean():.3%}) | {deployed:.2%} | "
            f"{100 * (right.mean() - deployed):.2f} | {100 * expected:.3f} |"
        )
    print()
    u8 = images[:STABILITY_IMAGES].numpy()
    variants = {
        "shift 1 px": [shifted(u8, *d) for d in ((0, 1), (1, 0), (0, -1), (-1, 0))],
        "shift 2 px": [shifted(u8, *d) for d in ((0, 2), (2, 0), (0, -2), (-2, 0))],
    }
    rng = np.random.default_rng(0)
    for sigma in (2, 8):
        variants[f"noise sd {sigma}/255"] = [
            np.clip(np.rint(u8 + rng.normal(0, sigma, u8.shape)), 0, 255).astype(np.uint8) for _ in range(4)
        ]
    print("| block (px) | grey levels | distinct hashed images | " + " | ".join(variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    for cell, levels in COARSENINGS:
        base = coarsen(u8, cell, levels).reshape(len(u8), -1)
        shares = [
            np.mean([(coarsen(v, cell, levels).reshape(len(u8), -1) == base).all(1).mean() for v in vs])
            for vs in variants.values()
        ]
        distinct = len({row.tobytes() for row in base})
        print(f"| {cell} | {levels} | {distinct:,} / {len(u8):,} | " + " | ".join(f"{s:.1%}" for s in shares) + " |")


if __name__ == "__main__":
    main()

"""What the seeded thief's labelled seed teaches on its own: a surrogate trained on the k labelled train images
alone, drawn, initialised and trained as `steal --attack seeded` draws, initialises and trains them, with no query.

    python experiments/seed_only.py DATA.h5 [--seeds 100] [--steps 1248] [--seed 0 --seed 1 ...]

Reads a prepared dataset; prints the test accuracy per seed and their mean ± sample std on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from stages.attacks._thief import SurrogateRecipe, Thief, train_surrogate  # noqa: E402
from stages.attacks.blackbox import predict  # noqa: E402
from stages.data import prepared as _data  # noqa: E402
from stages.steal import ADAM_LR  # noqa: E402


def seed_only(data: _data.Dataset, k: int, steps: int, seed: int, arch: str = "lenet5") -> float:
    """Test accuracy of a surrogate fitted to k labelled train images for `steps` steps of Adam at steal's rate."""
    images, labels = data.splits["train"]
    rng = torch.Generator().manual_seed(seed)  # steal's generator: the seeded thief's first draw is its seed
    pick = torch.randperm(len(images), generator=rng)[: min(k, len(images))]
    c, h, _ = data.shape
    torch.manual_seed(seed)  # steal initialises the surrogate from the seed
    net = models.build_model(arch, data.num_classes, c, h, data.mean, data.std)
    # One batch of the k images per epoch (k <= 128), so an epoch is a step.
    recipe = SurrogateRecipe(steps, 128, ADAM_LR, 0.0, 0.0, "adam", "constant")
    train_surrogate(Thief(net, recipe, data.num_classes, data.shape, rng), images[pick], labels[pick], steps)
    test_x, test_y = data.splits["test"]
    with torch.no_grad():
        return float((predict(net.eval(), _data.to_float(test_x), "cpu").argmax(1) == test_y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--seeds", type=int, default=100, help="k, the labelled images (seeded's `seeds`)")
    # The decision study's seeded cells: 20,000 answers, 8 epochs of 156 batches of 128 (its `steps: 1200`),
    # each step also a cross-entropy batch on the seed.
    parser.add_argument("--steps", type=int, default=1248)
    parser.add_argument("--seed", type=int, action="append")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = _data.load(args.data)
    seeds = args.seed or [0]
    accuracies = [seed_only(data, args.seeds, args.steps, s) for s in seeds]
    for s, a in zip(seeds, accuracies, strict=True):
        print(f"seed {s}: {100 * a:.2f} %")
    spread = f" ± {100 * statistics.stdev(accuracies):.1f}" if len(accuracies) > 1 else ""
    print(f"mean: {100 * statistics.mean(accuracies):.1f}{spread} ({len(accuracies)})")


if __name__ == "__main__":
    main()

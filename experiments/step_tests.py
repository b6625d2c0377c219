"""Tests the monitor could add against a JBDA thief that knows its step tests, measured offline (docs/results.md,
"Where the chain of step tests ends"). For one victim and its prepared dataset, and the transfer sets of JBDA thieves
that queried it (surrogate.h5 files):

- the L-infinity of a query's difference from its nearest earlier query of its predicted class (the last 200, as
  the young cohort's memory): a sign step of lambda, jittered or sparse, moves no pixel by more than lambda times
  (1 + jitter), where a benign digit's difference from its nearest moves whole strokes. Read as each class's benign
  quantile on 4 random replays of the val split, and applied to the test split and to the thieves' queries;
- the share of the pixels such a difference changes (a dense step changes every pixel it does not clip);
- a second confidence tier: the share of a key's last 200 answers below the benign 10 % quantile of the top
  probability, tested against Binomial(n, 0.1) at alpha 1e-6 as the OOD share is at 1 %; where it would first
  alert on the test and train splits replayed in file order, and on each thief's answers.

    python experiments/step_tests.py --victim V.h5 --data mnist.h5 [--thief jbda.h5 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stages, not an installed copy

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages.attacks import blackbox  # noqa: E402
from stages.data import prepared  # noqa: E402
from stages.serving import detectors, monitor  # noqa: E402

ORDERS = 4  # random replays of the val split the cuts are read on
SETTINGS = monitor.Settings()  # the window, minimum and alpha of the OOD share, which the second tier reads alike
QUANTILES = (0.0005, 0.001)  # the L-infinity and density cuts: each class's benign quantile on the val replays
TIER = 0.1  # the second confidence tier
say = functools.partial(print, file=sys.stderr)


def nearest(x: np.ndarray, classes: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """For each query (in order) with a full memory of its class: the L-infinity, the changed share (half a grey
    level or more) and the L2 of its difference from the nearest of the last `detectors.step_memory(k)` of its
    class (the young cohort's memory), and its class; exact repeats left out (the monitor carries a repeat's verdict
    from what it repeats)."""
    size = detectors.step_memory(k)
    memory = [np.zeros((0, x.shape[1]), np.float32) for _ in range(k)]
    peak, dense, l2, cls = [], [], [], []
    for xi, c in zip(x, classes.tolist(), strict=True):
        m = memory[c]
        if len(m) >= size:
            d = xi - m[((m - xi) ** 2).sum(1).argmin()]
            if np.abs(d).max() > 0:
                peak.append(np.abs(d).max())
                dense.append((np.abs(d) >= 0.5 / 255).mean())
                l2.append(np.sqrt(d @ d))
                cls.append(c)
        memory[c] = np.concatenate([m[-(size - 1) :], xi[None]])
    return np.array(peak), np.array(dense), np.array(l2), np.array(cls, dtype=np.int64)


def first_alert(flags: np.ndarray, q: float) -> int | None:
    """The answer at which a key's window of its last answers first holds too many flags for Binomial(n, q), judged
    as the monitor judges its OOD share (`monitor.ood_cutoffs` at q)."""
    s = dataclasses.replace(SETTINGS, ood_quantile=q)
    cutoffs = monitor.ood_cutoffs(s)
    counts = np.concatenate([[0], np.cumsum(flags)])
    for n in range(s.min_images, len(flags) + 1):
        lo = max(0, n - s.ood_window)
        if counts[n] - counts[lo] >= cutoffs[n - lo]:
            return n
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--thief", type=Path, action="append", default=[], help="a JBDA surrogate.h5 (repeatable)")
    parser.add_argument("--train-images", type=int, default=20000, help="of the train split replayed in file order")
    args = parser.parse_args()
    torch.set_num_threads(1)
    graph, _ = blackbox.open_victim(str(args.victim), "cpu")
    data = prepared.load(args.data, splits=("val", "test", "train"))

    def answer(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(images).float()
            x = x / 255.0 if images.dtype == np.uint8 else x
            return torch.cat([graph(x[i : i + 1000]) for i in range(0, len(x), 1000)]).numpy()

    def flat(images: np.ndarray) -> np.ndarray:
        x = images.reshape(len(images), -1).astype(np.float32)
        return x / 255.0 if images.dtype == np.uint8 else x

    val, test = data.splits["val"][0].numpy(), data.splits["test"][0].numpy()
    train = data.splits["train"][0].numpy()[: args.train_images]
    a_val, a_test, a_train = answer(val), answer(test), answer(train)
    k = a_val.shape[1]
    x_val, c_val = flat(val), a_val.argmax(1)
    rng = np.random.default_rng(0)
    replays = [nearest(x_val[o], c_val[o], k) for o in (rng.permutation(len(val)) for _ in range(ORDERS))]
    peak_v, dense_v, _, cls_v = (np.concatenate(parts) for parts in zip(*replays, strict=True))
    peak_t, dense_t, l2_t, cls_t = nearest(flat(test), a_test.argmax(1), k)
    share = detectors.STEP_SHARE * SETTINGS.ood_quantile
    radii = np.asarray(detectors.step_radii(x_val, c_val, k, share)[0])
    thieves = []
    for path in args.thief:
        with h5py.File(path, "r") as f:
            images, answers = f["transfer/images"][:], f["transfer/answers"][:]
        thieves.append((path.stem, nearest(flat(images), answers.argmax(1), k), answers))

    memory = detectors.step_memory(k)
    say(f"{args.victim.name} on {args.data.name}: benign differences from the nearest of the last {memory} of a class")
    for q in QUANTILES:
        for name, v, t, up in (("L-inf", peak_v, peak_t, False), ("changed share", dense_v, dense_t, True)):
            cuts = np.array([np.quantile(v[cls_v == c], 1 - q if up else q) for c in range(k)])
            hit = (t > cuts[cls_t]) if up else (t < cuts[cls_t])
            union = hit | (l2_t < radii[cls_t])
            line = (
                f"  {name} at the val {q:.2%} quantile: test split {hit.mean():.2%} ({hit.mean() / q:.1f}x), "
                f"with the radius {union.mean():.2%}"
            )
            for stem, (p, d, _, c), _ in thieves:
                child = (d > cuts[c]) if up else (p < cuts[c])
                line += f"; {stem} {child.mean():.1%} of {len(c):,}"
            say(line)
    under = (l2_t < radii[cls_t]).mean()
    say(f"  under the step radii alone (val, {share:.1%} quantile): test split {under:.2%}")
    cut = float(np.quantile(a_val.max(1), TIER))
    say(f"a second confidence tier: top probability below {cut:.4f}, the val split's {TIER:.0%} quantile")
    for name, answers in (("test split, file order", a_test), ("train split, file order", a_train)):
        flags = answers.max(1) < cut
        say(f"  {name}: {flags.mean():.2%} below; first alert at {first_alert(flags, TIER)} of {len(flags):,}")
    for stem, _, answers in thieves:
        flags = answers.max(1) < cut
        say(f"  {stem}: {flags.mean():.1%} below; first alert at {first_alert(flags, TIER)} of {len(flags):,}")


if __name__ == "__main__":
    main()

"""The measured null of a verification: the same marking rule and the same tests under keys that never marked
anything. Queries the real key left unmarked carry no mark under any key; under a fake key some of them draw a mark
(the marking rate of their victim confidence) and a keyed class (never the victim's top-1), controls are paired by
confidence as for the real marks, and the suspect meets both tests. A calibrated test gives fake-key p-values that
are uniform for any suspect, the thief's own copy included (its answers there were unmarked). N keys resolve a
share down to 1/N, far above the 1e-6 a copy is named at: a check of the exact p-value, not a verdict.
docs/method.md, "Verification"."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy.stats import kstest

from models.defenses import coarse_draws, coarsen, keyed_class, keyed_draws, keyed_top1, on_grid
from models.params import UserError
from stages.provenance import evidence as _evidence
from stages.provenance import significance

KEY_SEED = 20261205  # the fake keys are drawn from this seed, so a calibration repeats
MIN_MARKS = 2  # a fake key that marks fewer of the pool's queries is left out


@dataclass
class Pool:
    """The queries the real key left unmarked, one per hashed image: the image as the suspect sees it and as the
    watermark hashes it, the victim's confidence and top-1, and each query's marking rate."""

    images: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    coarse: np.ndarray  # uint8, coarsened as the watermark hashes
    confidence: np.ndarray
    top1: np.ndarray
    rate: np.ndarray  # ood_rate below the threshold, rate above (as the Watermark defense draws)
    num_classes: int
    mode: str


@dataclass(frozen=True)
class Null:
    keys: int  # fake keys that marked at least MIN_MARKS queries
    share_at_or_below: float  # of fake keys whose p is at or below the real key's
    below_005: float  # of fake keys whose p is below 0.05
    ks_p: float  # Kolmogorov-Smirnov, one-sided: are the fake-key p-values smaller than uniform?

    def to_dict(self) -> dict:
        return {f"null_{k}": v for k, v in asdict(self).items()}


def transfer_pool(path: Path, key: bytes, ev: _evidence.Evidence) -> Pool:
    """A transfer set records every answer with its confidence, keyed class and the marking threshold; the real key
    gives each answer's victim top-1 back from its keyed class."""
    with h5py.File(path, "r") as f:
        group = f["transfer/watermark"]
        marked = group["marked"][()].astype(bool)
        keyed = group["keyed_class"][()].astype(np.int64)
        confidence = group["confidence"][()].astype(np.float64)
        threshold, rate, ood_rate = (float(group.attrs[a]) for a in ("threshold", "rate", "ood_rate"))
        stored = f["transfer/images"]
        images = stored[()].astype(np.float32) / float(stored.attrs.get("scale", 1.0))
    grid = on_grid(images)
    _, pick = keyed_draws(grid, key, ev.cell, ev.levels)
    top1 = keyed_top1(pick, keyed, ev.num_classes)
    keep = ~marked & _evidence.distinct(images, 1.0, ev.cell, ev.levels)
    return Pool(
        images=images[keep],
        coarse=coarsen(grid[keep], ev.cell, ev.levels),
        confidence=confidence[keep],
        top1=top1[keep],
        rate=np.where(confidence < threshold, max(rate, ood_rate), rate)[keep],
        num_classes=ev.num_classes,
        mode=ev.mode,
    )


def fake_keys(n: int, seed: int = KEY_SEED) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32) for _ in range(n)]


def outcomes(pool: Pool, probs: list[np.ndarray], keys: list[bytes]) -> np.ndarray:
    """(suspects, keys, 3): p agreement, p score and p under each fake key, for each suspect's probabilities on the
    pool's queries (one hash per query and key, shared by the suspects); NaN where a key marked too few."""
    out = np.full((len(probs), len(keys), 3), np.nan)
    for k, key in enumerate(keys):
        uniform, pick = coarse_draws(pool.coarse, key)
        marked = uniform < pool.rate
        if marked.sum() < MIN_MARKS or marked.sum() > (~marked).sum():
            continue
        keyed = keyed_class(pick, pool.top1, pool.num_classes)
        pm, pc = _evidence._controls(marked, pool.confidence)
        for s, pr in enumerate(probs):
            o, _, _ = significance.decide(pr[pm], keyed[pm], pr[pc], keyed[pc], pool.mode)
            out[s, k] = o.p_agreement, o.p_score, o.p_value
    return out


def summarise(null_p: np.ndarray, observed: float) -> Null:
    """One suspect's fake-key p-values (NaN: left out) against the real key's p."""
    p = null_p[~np.isnan(null_p)]
    if len(p) == 0:
        raise UserError("no fake key marked enough of the evidence's unmarked queries; give more --null-keys")
    return Null(
        keys=len(p),
        share_at_or_below=float(np.mean(p <= observed)),
        below_005=float(np.mean(p < 0.05)),
        ks_p=float(kstest(p, "uniform", alternative="greater").pvalue),
    )

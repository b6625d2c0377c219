"""The fake-key null of `verify` (docs/method.md, "Verification"; docs/results.md, "Proving a theft"): for an evidence
set (a surrogate.h5 whose transfer set holds marks) and suspects, the p-values of the same tests under many keys
that never marked anything, drawn on the queries the real key left unmarked with the same marking rule, and how far
they are from uniform (the share below 0.05, 0.01 and 0.001; Kolmogorov-Smirnov against the uniform). Also: under
how many fake keys at least as many suspects fall below 0.05 together as under the real key.

    python experiments/null_keys.py EVIDENCE.h5 --key watermark.key --suspect S.h5 [--suspect ...] [--keys 500]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stages, not an installed copy

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import kstest  # noqa: E402

from stages.deploy import watermark_key as _keys  # noqa: E402
from stages.provenance import evidence as _evidence  # noqa: E402
from stages.provenance import null_keys, significance  # noqa: E402
from stages.provenance import suspect as _suspect  # noqa: E402

LEVELS = (0.05, 0.01, 0.001)
say = functools.partial(print, file=sys.stderr)  # tables on stderr, as every measurement here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evidence", type=Path)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--suspect", action="append", required=True)
    parser.add_argument("--keys", type=int, default=500, help="fake keys")
    parser.add_argument("--json", type=Path, help="write the per-key p-values here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ev = _evidence.load(args.evidence)
    pool = null_keys.transfer_pool(args.evidence, _keys.load(args.key), ev)
    probs, observed = [], []
    for spec in args.suspect:
        model = _suspect.open_suspect(spec, None)
        probs.append(_suspect.query(model, pool.images))
        o, _, _ = significance.decide(
            _suspect.query(model, ev.marked_images),
            ev.marked_class,
            _suspect.query(model, ev.control_images),
            ev.control_class,
            ev.mode,
        )
        observed.append((o.p_agreement, o.p_score, o.p_value))
    null = null_keys.outcomes(pool, probs, null_keys.fake_keys(args.keys))
    ok = ~np.isnan(null[0, :, 0])
    say(f"{args.evidence.name}: {len(pool.top1):,} unmarked hashed images, {int(ok.sum())} fake keys")
    header = (
        "| suspect | p (real key) | p score (real key) | fake keys: p <= real | "
        + " | ".join(f"p < {a:g}" for a in LEVELS)
        + " | p score < 0.05 | KS p score (two-sided) | KS p (p too small) |"
    )
    say(header)
    say("|" + "---|" * (header.count("|") - 1))
    rows = []
    for spec, obs, res in zip(args.suspect, observed, null, strict=True):
        res = res[ok]
        share = float(np.mean(res[:, 2] <= obs[2]))
        row = dict(
            suspect=Path(spec).stem,
            observed=dict(zip(("p_agreement", "p_score", "p"), obs, strict=True)),
            share_at_or_below=share,
            below={str(a): float(np.mean(res[:, 2] < a)) for a in LEVELS},
            score_below_005=float(np.mean(res[:, 1] < 0.05)),
            ks_score=float(kstest(res[:, 1], "uniform").pvalue),
            ks_p_small=float(kstest(res[:, 2], "uniform", alternative="greater").pvalue),
        )
        rows.append(row)
        below = " | ".join(f"{row['below'][str(a)]:.1%}" for a in LEVELS)
        say(
            f"| {row['suspect']} | {obs[2]:.2g} | {obs[1]:.2g} | {share:.1%} | {below} | {row['score_below_005']:.1%} "
            f"| {row['ks_score']:.2g} | {row['ks_p_small']:.2g} |"
        )
    others = np.array([Path(s).resolve() != args.evidence.resolve() for s in args.suspect])  # not the thief
    together_real = int(sum(o[2] < 0.05 for o, other in zip(observed, others, strict=True) if other))
    together_fake = (null[others][:, ok, 2] < 0.05).sum(0)
    say(
        f"\nsuspects other than the thief below 0.05 together: {together_real} of {int(others.sum())} under the "
        "real key; at least as many "
        f"under {np.mean(together_fake >= together_real):.1%} of the fake keys (median {np.median(together_fake):g})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(
                    evidence=str(args.evidence),
                    keys=int(ok.sum()),
                    suspects=rows,
                    together_real=together_real,
                    together_fake=together_fake.tolist(),
                    null=null[:, ok].tolist(),
                )
            )
        )


if __name__ == "__main__":
    main()

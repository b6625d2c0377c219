"""Where reverse sigmoid keeps a victim's top class: for a grid of beta and gamma, the share of the victim's test
answers whose top class survives the defense (strictly ahead, by more than 1e-6), the share that come out uniform,
and how far the defense, and the same formula with p clipped at 1e-7, lie from the exact formula of Lee et al.
(float64 from the victim's logits, no clipping); printed as a Markdown table (docs/method.md, "Defenses").

    python experiments/reverse_sigmoid.py artifacts/victim.h5 [--data artifacts/data/mnist.h5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stages, not an installed copy

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.special import expit, logsumexp, softmax  # noqa: E402

from models.defenses import ReverseSigmoid  # noqa: E402
from stages.core.artifacts import UserError  # noqa: E402
from stages.data import prepared as _data
from stages.training import victim as _victim

BETAS = (0.2, 0.5, 0.8, 1.0)
GAMMAS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def exact(logits: np.ndarray, beta: float, gamma: float, clip: float = 0.0) -> np.ndarray:
    """The formula in float64 from the logits z: logit p_k = z_k - logsumexp of the other z, exact where 1 - p_k
    is below float64's resolution; with clip > 0, p is clipped to [clip, 1 - clip] before the logit instead."""
    z = logits.astype(np.float64)
    p = softmax(z, axis=1)
    if clip > 0:
        q = np.clip(p, clip, 1.0 - clip)
        logit = np.log(q) - np.log1p(-q)
    else:
        others = np.where(np.eye(z.shape[1], dtype=bool)[None], -np.inf, z[:, None, :])  # row k without z_k
        logit = z - logsumexp(others, axis=2)
    out = np.maximum(p - beta * (expit(gamma * logit) - 0.5), 0.0)
    return out / out.sum(1, keepdims=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("victim", type=Path)
    parser.add_argument("--data", help="the victim's dataset [default: the one it was trained on]")
    args = parser.parse_args()
    try:
        model, info = _victim.load(args.victim)
        data = _data.load(args.data or info.dataset_path, splits=("test",))
        _victim.check_matches(info, data)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with torch.no_grad():
        logits = model(_data.to_float(data.splits["test"][0]))
    probs = torch.softmax(logits, 1)  # what the deployed graph hands the defense
    tiny = float((probs < 1e-7).float().mean())
    print(
        f"{args.victim.name} on {len(probs)} {data.name} test images; {100 * tiny:.1f}% of the entries are below "
        f"1e-7, top class above 1/2 in {100 * float((probs.max(1).values > 0.5).float().mean()):.1f}% of rows\n"
    )
    print(
        "| beta | gamma | top class kept | uniform answers | max abs diff from the exact formula | the same, "
        "p clipped at 1e-7 |"
    )
    print("|---|---|---|---|---|---|")
    for beta in BETAS:
        for gamma in GAMMAS:
            with torch.no_grad():
                out = ReverseSigmoid(beta, gamma)(torch.empty(0), probs)
            top = probs.argmax(1, keepdim=True)
            rest = out.scatter(1, top, -1.0).max(1).values
            kept = float((out.gather(1, top)[:, 0] > rest + 1e-6).float().mean())  # a tie is not kept
            uniform = float(((out - 1.0 / out.shape[1]).abs().max(1).values < 1e-6).float().mean())
            exact_out = exact(logits.numpy(), beta, gamma)
            diff = float(np.abs(out.double().numpy() - exact_out).max())
            clipped = float(np.abs(exact(logits.numpy(), beta, gamma, 1e-7) - exact_out).max())
            print(f"| {beta:g} | {gamma:g} | {100 * kept:.1f}% | {100 * uniform:.1f}% | {diff:.1e} | {clipped:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Posterior defenses that sit inside the deployed graph: images in [0, 1] -> network -> softmax -> defense.

Every defense maps a batch (images, probabilities) to probabilities on the simplex and scripts to TorchScript,
so `export --defense` bakes it, with any network it needs, into one graph. `DEFENSES` is the registry the CLI
offers; each class lists its CLI parameters, with their defaults, in `PARAMS` (its constructor takes every one of
them, so a defense that takes a seed says so there) and the victim-side inputs it is built from in `NEEDS`.
InI needs none of this: its victim is deployed with `none`, one plain forward pass. The papers behind each:
docs/method.md, "Defenses".
"""

from __future__ import annotations

import hashlib
import hmac
import math

import numpy as np
import torch
from torch import nn

from models.params import Param


class NoDefense(nn.Module):
    """The undefended posterior (and InI's: its protection is in the weights)."""

    PARAMS: dict[str, Param] = {}
    NEEDS: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return probs


def _renormalise(out: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Scale rows back onto the simplex; a row with no mass left keeps `fallback`."""
    total = out.sum(1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-12), fallback)


def _move_towards(probs: torch.Tensor, target: torch.Tensor, l1: float) -> torch.Tensor:
    """y~ = (1 - a) y + a y*, a = min(1, l1 / |y* - y|_1): the convex step of MAD's L1 budget (stays on the simplex)."""
    dist = (target - probs).abs().sum(1, keepdim=True)
    alpha = torch.clamp(l1 / dist.clamp_min(1e-12), max=1.0)
    return (1.0 - alpha) * probs + alpha * target


def _gradient_gram(features: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Gram matrix M_kj = <g_k, g_j> of the per-class last-layer gradients g_k = d log q_k / d[W, b].

    With h the penultimate features and q = softmax(W h + b): d log q_k / dW = (e_k - q) h^T and d/db = e_k - q,
    so <g_k, g_j> = (e_k - q).(e_j - q) (|h|^2 + 1). Shape (B, K, K); never forms the (K, K*D) gradients.
    """
    k = q.shape[1]
    eye = torch.eye(k, dtype=q.dtype, device=q.device).unsqueeze(0)
    qq = (q * q).sum(1)[:, None, None]
    centred = eye - q[:, None, :] - q[:, :, None] + qq
    return centred * ((features * features).sum(1) + 1.0)[:, None, None]


class ReverseSigmoid(nn.Module):
    """Reverse sigmoid (Lee et al., 2019): y~ = normalise(max(0, y - beta (sigmoid(gamma logit y) - 1/2))).

    Exact at p = 0 and p = 1 without clipping: logit p = log p - log(1 - p) runs to -inf or +inf there, and the
    sigmoid of it to 0 or 1, as the formula's limit does. The top class's 1 - p is the sum of the other entries:
    the same for a probability vector, but float32 holds a top probability near 1 only to 6e-8, so 1 - p computed
    from it is off by up to 100 % where 1 - p is 1e-7 (two runtimes whose softmax differed by one float32 step
    near 1 answered 2e-4 apart at beta 0.8, gamma 0.2). What stays
    inexact is the float32 softmax's underflow: an entry below 1e-45 reads 0, where the formula sees p^gamma,
    0.006 at gamma 0.05; from gamma 0.1 on the answer is within 1e-5 of the formula on the logits in float64.
    Whether the top class survives depends on beta and gamma together: with beta 1 and gamma 1 every entry becomes
    1/2 and the answer uniform, and larger gamma reorders most answers (measured: docs/method.md, "Defenses").
    """

    PARAMS = {
        "beta": Param(0.8, 0.0, 1.0, False, "perturbation scale"),
        "gamma": Param(0.2, 1e-6, 100.0, False, "sigmoid temperature"),
    }
    NEEDS: tuple[str, ...] = ()

    def __init__(self, beta: float, gamma: float):
        super().__init__()
        self.beta = float(beta)
        self.gamma = float(gamma)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        p = probs.clamp(0.0, 1.0)
        top = p.argmax(1, keepdim=True)
        rest = p.scatter(1, top, 0.0).sum(1, keepdim=True)  # 1 - p of the top class, without cancellation
        logit = torch.log(p) - torch.log((1.0 - p).scatter(1, top, rest))  # -inf at p = 0, +inf at p = 1
        r = self.beta * (torch.sigmoid(self.gamma * logit) - 0.5)
        return _renormalise((probs - r).clamp_min(0.0), probs)


class MAD(nn.Module):
    """Maximizing Angular Deviation (Orekondy et al., 2020, "Prediction poisoning"), batched.

    Proxy F_A: a random-init network of the victim's architecture. G stacks the per-class gradients of
    log F_A(x)_k w.r.t. its last linear layer; the target is the simplex vertex y* maximising the angular
    deviation |G^T y*/|G^T y*| - G^T y/|G^T y||^2 (the authors' objective), and the answer moves from y
    towards y* by at most eps in L1. All K candidates are scored at once through the (K, K) Gram matrix.
    """

    PARAMS = {
        "eps": Param(1.1, 0.0, 2.0, False, "L1 perturbation budget"),
        "seed": Param(0, 0, 2**31 - 1, True, "seed of the random-init proxy"),
    }
    NEEDS = ("proxy",)
    ARGMAX = False

    def __init__(self, proxy: nn.Module, eps: float, seed: int):
        super().__init__()
        self.proxy = proxy.eval().requires_grad_(False)  # drawn with `seed` by whoever builds the defense
        self.eps = float(eps)
        self.seed = int(seed)
        self.argmax = bool(self.ARGMAX)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        features = self.proxy.features(x)
        q = torch.softmax(self.proxy.net.fc(features), dim=1)
        candidates = mad_candidates(probs, self.argmax)
        return _move_towards(probs, mad_target(_gradient_gram(features, q), probs, candidates), self.eps)


class MADArgmax(MAD):
    """MAD restricted to targets that keep the victim's top-1 label (the authors' "argmax" variant)."""

    ARGMAX = True


def mad_candidates(probs: torch.Tensor, argmax: bool) -> torch.Tensor:
    """Candidate targets (B, K, K): the K vertices, or for argmax-preserving MAD e_c and (1/2 + d) e_c + (1/2 -
    d) e_k."""
    b, k = probs.shape
    eye = torch.eye(k, dtype=probs.dtype, device=probs.device).expand(b, k, k)
    if not argmax:
        return eye
    top = torch.nn.functional.one_hot(probs.argmax(1), k).to(probs.dtype)[:, None, :]  # (B, 1, K)
    margin = 1e-3  # keeps the top class strictly ahead after the step
    mixed = (0.5 + margin) * top + (0.5 - margin) * eye
    return torch.where(top.transpose(1, 2) > 0, top.expand(b, k, k), mixed)


def mad_target(gram: torch.Tensor, probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The candidate c maximising |u/|u| - a/|a||^2 = 2 - 2 <u, a>/(|u||a|), u = G^T c, a = G^T y, via <G^T u,
    G^T v> = u M v."""
    my = torch.bmm(gram, probs.unsqueeze(2)).squeeze(2)  # (B, K)
    aa = (probs * my).sum(1, keepdim=True)  # |a|^2
    ua = torch.bmm(candidates, my.unsqueeze(2)).squeeze(2)  # (B, J)
    uu = (torch.bmm(candidates, gram) * candidates).sum(2)  # |u_j|^2
    objective = 2.0 - 2.0 * ua / (uu.clamp_min(1e-12).sqrt() * aa.clamp_min(1e-12).sqrt())
    best = objective.argmax(1)
    return candidates[torch.arange(probs.shape[0], device=probs.device), best]


class AdaptiveMisinformation(nn.Module):
    """Adaptive Misinformation (Kariyappa & Qureshi, 2020): y~ = (1 - a) y + a softmax(misinformation(x)),
    a = 1 / (1 + exp(nu (max y - tau))): confident (in-distribution) queries pass, the rest get misinformation.
    Needs a victim trained with outlier exposure and its misinformation network (`train --objective outlier-exposure`).
    """

    PARAMS = {
        "tau": Param(0.5, 0.0, 1.0, False, "confidence threshold below which answers are replaced"),
        "nu": Param(1000.0, 0.0, 1e6, False, "sharpness of the switch"),
    }
    NEEDS = ("misinformation",)

    def __init__(self, misinformation: nn.Module, tau: float, nu: float):
        super().__init__()
        self.misinformation = misinformation.eval().requires_grad_(False)
        self.tau = float(tau)
        self.nu = float(nu)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(-self.nu * (probs.max(1, keepdim=True)[0] - self.tau))
        return (1.0 - alpha) * probs + alpha * torch.softmax(self.misinformation(x), dim=1)


class Grad2(nn.Module):
    """Gradient redirection (GRAD², Mazeika et al., 2022) against the direction the true answer would give.

    With a surrogate S (random init, victim's architecture) and last-layer gradients g_k of log S(x)_k, the
    thief's gradient on answer y~ is -G^T y~; we minimise its alignment <G^T y~, G^T y> = y~ M y, a linear
    objective over {simplex, |y~ - y|_1 <= eps}, solved exactly by moving eps/2 of mass greedily from the
    most-aligned classes to the least-aligned one.
    """

    PARAMS = {
        "eps": Param(1.0, 0.0, 2.0, False, "L1 perturbation budget (eps/2 probability mass moved)"),
        "seed": Param(0, 0, 2**31 - 1, True, "seed of the random-init surrogate"),
    }
    NEEDS = ("proxy",)

    def __init__(self, proxy: nn.Module, eps: float, seed: int):
        super().__init__()
        self.proxy = proxy.eval().requires_grad_(False)  # drawn with `seed` by whoever builds the defense
        self.eps = float(eps)
        self.seed = int(seed)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        features = self.proxy.features(x)
        q = torch.softmax(self.proxy.net.fc(features), dim=1)
        cost = torch.bmm(_gradient_gram(features, q), probs.unsqueeze(2)).squeeze(2)  # (B, K): y~ M y = y~ . cost
        return greedy_mass_move(probs, cost, self.eps / 2.0)


def greedy_mass_move(probs: torch.Tensor, cost: torch.Tensor, mass: float) -> torch.Tensor:
    """Exact minimiser of cost . y~ over the simplex with |y~ - y|_1 <= 2 mass: move mass to the cheapest class,
    taking it from the most expensive classes first (fractional knapsack)."""
    sink = cost.argmin(1, keepdim=True)
    room = 1.0 - probs.gather(1, sink)
    moved = torch.minimum(torch.full_like(room, mass), room)
    order = cost.argsort(1, descending=True)
    donors = probs.gather(1, order).scatter(1, (order == sink).long().argmax(1, keepdim=True), 0.0)
    before = donors.cumsum(1) - donors  # mass available in more expensive classes
    taken = torch.minimum(donors, (moved - before).clamp_min(0.0))
    out = probs - torch.zeros_like(probs).scatter(1, order, taken)
    return out.scatter_add(1, sink, moved).clamp_min(0.0)


class Top1(nn.Module):
    """Label-only answers: the one-hot of the top class."""

    PARAMS: dict[str, Param] = {}
    NEEDS: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)


class Rounding(nn.Module):
    """Probabilities rounded to `decimals` places. By default (renormalise=1) by largest remainder, so the answer
    still sums to 1: eight entries of 0.125 become two of 0.2 and six of 0.1 at one decimal. renormalise=0 rounds
    each entry half to even and leaves the sum where it falls, as the prediction-poisoning reference code does
    (the same eight entries become 0.1 each, summing to 0.8; a flat answer can round to all zeros).
    """

    PARAMS = {
        "decimals": Param(2, 0, 6, True, "decimal places kept"),
        "renormalise": Param(1, 0, 1, True, "1: largest remainder, summing to 1; 0: plain rounding"),
    }
    NEEDS: tuple[str, ...] = ()

    def __init__(self, decimals: int, renormalise: int):
        super().__init__()
        self.scale = float(10 ** int(decimals))
        self.renormalise = bool(renormalise)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        units = probs * self.scale
        if not self.renormalise:
            return torch.round(units) / self.scale
        floor = torch.floor(units)
        deficit = torch.round(self.scale - floor.sum(1, keepdim=True)).clamp(0.0, float(probs.shape[1]))
        rank = (units - floor).argsort(1, descending=True).argsort(1)  # 0 = largest remainder
        return (floor + (rank.to(probs.dtype) < deficit).to(probs.dtype)) / self.scale


class Noise(nn.Module):
    """Random L1 noise: move `l1` (in L1) towards a uniformly random point of the simplex.

    The random point is a seeded hash of the image, so one image always gets the same noise (averaging
    repeated queries of it does not cancel the noise) and the graph stays deterministic and scriptable.
    """

    PARAMS = {
        "l1": Param(0.5, 0.0, 2.0, False, "L1 size of the perturbation"),
        "seed": Param(0, 0, 2**31 - 1, True, "seed of the noise"),
    }
    NEEDS = ("num_classes", "input_shape")

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], l1: float, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        numel = int(math.prod(input_shape))
        self.register_buffer("projection", torch.randn(num_classes, numel, generator=generator, dtype=torch.float64))
        self.register_buffer("offset", torch.rand(num_classes, generator=generator, dtype=torch.float64) * 1000.0)
        self.l1 = float(l1)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1).double() @ self.projection.t() + self.offset
        uniform = torch.frac(torch.sin(z) * 43758.5453).abs().clamp(1e-9, 1.0 - 1e-9)  # hash -> U(0, 1)
        exponential = -torch.log(uniform)
        target = (exponential / exponential.sum(1, keepdim=True)).to(
            probs.dtype
        )  # Dirichlet(1): uniform on the simplex
        return _move_towards(probs, target, self.l1)


class Gate(nn.Module):
    """Confidence gate: an answer whose top probability falls below `threshold` is replaced, and every other answer
    passes untouched. The replacement is the uniform distribution (decoy=0), or a decoy (decoy=1): the answer rolled
    one class on (class k's probability given to class k + 1 mod K), so the top class's mass lands on a fixed other
    class, the same for every input, and the decoy keeps the shape of a real answer. A thief who knows the gate can
    spot a decoy (its top probability is below the threshold) and roll it back; uniform answers carry nothing.
    With quantile > 0 the threshold is calibrated when the defense is built: that quantile of the victim's top
    probabilities on its own val split, so about that share of benign queries is gated (stages/deploy/defense.py).
    """

    PARAMS = {
        "threshold": Param(0.5, 0.0, 1.0, False, "top probability below which an answer is gated"),
        "quantile": Param(
            0.0,
            0.0,
            1.0,
            False,
            "if above 0: the threshold is this quantile of benign (val) top probabilities, replacing threshold",
        ),
        "decoy": Param(0, 0, 1, True, "gated answers: 0 uniform, 1 rolled one class on"),
    }
    NEEDS = ("benign_confidence",)

    def __init__(self, threshold: float, quantile: float, decoy: int):
        super().__init__()
        self.threshold = float(threshold)  # already calibrated from `quantile` when that is above 0
        self.decoy = bool(decoy)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        gated = probs.max(1, keepdim=True)[0] < self.threshold
        if self.decoy:
            replacement = probs.roll(1, 1)
        else:
            replacement = torch.full_like(probs, 1.0 / probs.shape[1])
        return torch.where(gated, replacement, probs)


def key_fingerprint(key: bytes) -> str:
    """What artifacts record of a watermark key: 16 hex digits of HMAC-SHA256(key, "fingerprint"), which name the
    key without revealing it."""
    return hmac.new(key, b"fingerprint", hashlib.sha256).hexdigest()[:16]


def coarsen(images: np.ndarray, cell: int, levels: int) -> np.ndarray:
    """uint8 images (N, C, H, W) -> the means of `cell` x `cell` blocks (edges padded by replication), quantised to
    `levels` grey levels: what the watermark hashes, so that an image re-encoded or nudged by less than a level
    keeps its mark (how much a shift or noise changes it is measured: docs/results.md, "Proving a theft")."""
    n, c, h, w = images.shape
    ph, pw = -h % cell, -w % cell
    x = np.pad(images.astype(np.float32), ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    x = x.reshape(n, c, (h + ph) // cell, cell, (w + pw) // cell, cell).mean((3, 5))
    return np.minimum((x * (levels / 256.0)).astype(np.uint8), levels - 1)


def on_grid(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] as the uint8 the watermark hashes: clipped, scaled and rounded in double precision, so that
    the defense, the ledger and `verify` get the same bytes whatever float width holds the image (a float32 product
    rounds differently at half a grey level, where JBDA's sign steps of 0.1 = 25.5 / 255 land)."""
    return np.rint(np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def keyed_draws(images: np.ndarray, key: bytes, cell: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, from HMAC-SHA256(key, shape and coarsened image): a uniform draw in [0, 1) (marked when below the
    rate) and a 64-bit integer (which class the mark points to). The same image always draws the same."""
    return coarse_draws(coarsen(images, cell, levels), key)


def coarse_draws(coarse: np.ndarray, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """keyed_draws on images already coarsened (what a calibration against many keys hashes once)."""
    prefix = np.asarray(coarse.shape[1:], dtype=np.int32).tobytes()
    uniform = np.empty(len(coarse), dtype=np.float64)
    pick = np.empty(len(coarse), dtype=np.uint64)
    for i, image in enumerate(coarse):
        digest = hmac.new(key, prefix + image.tobytes(), hashlib.sha256).digest()
        uniform[i] = int.from_bytes(digest[:8], "big") / 2.0**64
        pick[i] = int.from_bytes(digest[8:16], "big")
    return uniform, pick


def keyed_class(pick: np.ndarray, top1: np.ndarray, num_classes: int) -> np.ndarray:
    """The class a mark points to: never the victim's own top-1, uniform over the other K - 1 classes."""
    offset = 1 + (pick % np.uint64(num_classes - 1)).astype(np.int64)
    return (np.asarray(top1, dtype=np.int64) + offset) % num_classes


def keyed_top1(pick: np.ndarray, keyed: np.ndarray, num_classes: int) -> np.ndarray:
    """The victim's top-1 behind a recorded keyed class (keyed_class inverted, with the same key's pick)."""
    offset = 1 + (pick % np.uint64(num_classes - 1)).astype(np.int64)
    return (np.asarray(keyed, dtype=np.int64) - offset) % num_classes


MARGIN = 1e-3  # raise=1 keeps the top-1 ahead of the keyed class by this share of its probability


class Watermark(nn.Module):
    """Keyed marks (DAWN, Szyller et al., 2021): HMAC-SHA256 of the coarsened image under a secret key decides
    whether an answer is marked and which class (never the victim's top-1) the mark points to. A marked answer has
    that class's and the top-1's probabilities swapped (raise=0: its top-1 is the keyed class, given at least
    `confidence`, the other classes scaled down in proportion), or the keyed class raised to just below the top-1
    (raise=1: the label kept). Answers whose top probability falls below `threshold` (the benign `quantile`, as
    serve's monitor calibrates it) are marked at `ood_rate`, the rest at `rate`. The same image always gets the
    same answer. The hash runs on the host (Python's hmac), so the defense is not scriptable and never exported: the
    key would ship with the model. `log`, when a list, receives each batch's (marked, keyed class, top probability)
    for the owner's record. Method: docs/method.md, "Watermark".
    """

    PARAMS = {
        "rate": Param(0.0005, 0.0, 0.005, False, "share of answers marked"),
        "ood_rate": Param(0.1, 0.0, 1.0, False, "share of OOD-looking answers (top probability below threshold)"),
        "threshold": Param(0.0, 0.0, 1.0, False, "top probability below which an answer looks OOD"),
        "quantile": Param(
            0.01, 0.0, 1.0, False, "if above 0: threshold is this quantile of benign (val) top probabilities"
        ),
        "raise": Param(0, 0, 1, True, "0: top-1 moved to the keyed class; 1: keyed class raised to second"),
        # measured on MNIST (docs/results.md, "Proving a theft"): a soft-label knockoff thief on the Latin letters
        # went from p 6.2e-4 (the swapped answer's own top probability) to 7.6e-8 at 0.99, for the same theft
        "confidence": Param(
            0.99, 0.0, 0.999, False, "swap: the keyed class's probability at least this (0: the answer's own top)"
        ),
        # measured on MNIST (docs/results.md, "Proving a theft"): 4 x 4 blocks at 4 levels keep 92 % of hashes
        # under noise of sd 2/255 (2 px blocks at 16 levels: 16 %) and 94.5 % of test images apart; no coarsening
        # that keeps images apart survives a 1 px shift (at most 2 %)
        "cell": Param(4, 1, 16, True, "pixels per side of the blocks averaged before hashing"),
        "levels": Param(4, 2, 256, True, "grey levels of the hashed image"),
    }
    NEEDS = ("benign_confidence", "watermark_key")
    SCRIPTABLE = False

    def __init__(
        self,
        key: bytes,
        rate: float,
        ood_rate: float,
        threshold: float,
        quantile: float,
        cell: int,
        levels: int,
        **flags,
    ):
        super().__init__()
        self.key = bytes(key)
        self.rate, self.ood_rate, self.threshold = float(rate), float(ood_rate), float(threshold)
        self.raise_ = bool(flags.pop("raise"))
        self.confidence = float(flags.pop("confidence"))
        self.cell, self.levels = int(cell), int(levels)
        self.log: list | None = None

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.key)

    def describe(self) -> dict:
        """The marking settings an owner records beside the marks (never the key: its fingerprint)."""
        return dict(
            key_fingerprint=self.fingerprint,
            rate=self.rate,
            ood_rate=self.ood_rate,
            threshold=self.threshold,
            mode="raise" if self.raise_ else "swap",
            confidence=self.confidence,
            cell=self.cell,
            levels=self.levels,
        )

    def marks(self, x: torch.Tensor, probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(marked, keyed class, top probability) for images x in [0, 1] and the victim's answers."""
        images = on_grid(x.detach().cpu().numpy())
        uniform, pick = keyed_draws(images, self.key, self.cell, self.levels)
        p = probs.detach().cpu()
        top, top1 = p.max(1)
        top = top.numpy()
        rate = np.where(top < self.threshold, max(self.rate, self.ood_rate), self.rate)
        return uniform < rate, keyed_class(pick, top1.numpy(), probs.shape[1]), top

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        marked, keyed, top = self.marks(x, probs)
        if self.log is not None:
            self.log.append((marked, keyed, top))
        if not marked.any():
            return probs
        rows = torch.from_numpy(np.flatnonzero(marked)).to(probs.device)
        keyed_t = torch.from_numpy(keyed[marked]).to(probs.device)
        out = probs.clone()
        p = out[rows]
        top1 = p.argmax(1)
        first, second = p.gather(1, top1[:, None]), p.gather(1, keyed_t[:, None])
        if self.raise_:  # the keyed class raised to just below the top-1, from the other classes' mass
            others = p.scatter(1, top1[:, None], 0.0).scatter(1, keyed_t[:, None], 0.0)
            rest = others.sum(1, keepdim=True)
            need = (first * (1.0 - 2.0 * MARGIN) - second).clamp_min(0.0)
            enough = need <= rest
            others = torch.where(enough, others * (1.0 - need / rest.clamp_min(1e-12)), torch.zeros_like(others))
            # not enough mass elsewhere: the pair shares it all, the top-1 kept ahead
            first = torch.where(enough, first, torch.full_like(first, 0.5 + MARGIN))
            second = torch.where(enough, second + need, torch.full_like(second, 0.5 - MARGIN))
            p = others.scatter(1, top1[:, None], first).scatter(1, keyed_t[:, None], second)
        else:
            p = p.scatter(1, top1[:, None], second).scatter(1, keyed_t[:, None], first)
            if self.confidence > 0:  # the keyed class sharpened; the others keep their proportions
                lifted = first.clamp_min(self.confidence)
                p = (p * (1.0 - lifted) / (1.0 - first).clamp_min(1e-12)).scatter(1, keyed_t[:, None], lifted)
        out[rows] = p
        return out


class Deployed(nn.Module):
    """The one graph a prediction API serves."""

    def __init__(self, classifier: nn.Module, defense: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense(x, torch.softmax(self.classifier(x), dim=1))


class Defended(nn.Module):
    """A defense on top of a graph that already answers probabilities (a deployed `victim.pt`)."""

    def __init__(self, deployed: nn.Module, defense: nn.Module):
        super().__init__()
        self.deployed = deployed
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense(x, self.deployed(x))


DEFENSES: dict[str, type[nn.Module]] = {
    "none": NoDefense,
    "reverse-sigmoid": ReverseSigmoid,
    "mad": MAD,
    "mad-argmax": MADArgmax,
    "adaptive-misinformation": AdaptiveMisinformation,
    "grad2": Grad2,
    "top1": Top1,
    "rounding": Rounding,
    "noise": Noise,
    "gate": Gate,
    "watermark": Watermark,
}

# Defenses whose answer keeps the victim's top-1 label (reverse-sigmoid: at its default beta and gamma, when the top
# probability exceeds 1/2; larger gamma reorders answers, docs/method.md).
ARGMAX_PRESERVING = ("none", "mad-argmax", "top1", "reverse-sigmoid")

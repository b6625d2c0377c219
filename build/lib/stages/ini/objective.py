"""InI's objective (docs/method.md, "The objective"): the five loss terms, PCGrad as the official code merges them
("Merging the terms"), the clipping of the merged gradient, and how the victim's BatchNorm sees OOD batches
("BatchNorm and OOD batches"). Both training steps (`reference.py`, `fast.py`) build on this module alone."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from stages.training.torchrun import Ranks

# The loss terms in the order the official code lists them (its PCGrad shuffles positions in this list).
TERMS = ("benign", "id_distance", "ood_distance", "isolation", "vanishing")
DISTANCES = ("l1", "kl")
KL_DIRECTIONS = ("official", "attacker")
BN_MODES = ("mixed", "separate", "eval-ood", "joint")
REDUCTIONS = ("mean", "sum")
COSINE_EPS = 1e-8  # F.cosine_similarity's, as the official isolation term uses
# --clip spike: the merged gradient is cut at this multiple of the running mean of the norms before it. Measured on
# the broad-preset victim that collapsed: ordinary steps 0.6-0.8 (99th percentile 1.4, twice the mean), the step
# that killed it 11x the running mean.
SPIKE_FACTOR = 2.0


@dataclass(frozen=True)
class Objective:
    """Weights and switches of the InI loss. The defaults are the paper's official run, and `train-ini`'s flags
    take theirs from here."""

    beta: float = 0.0  # ID distance
    gamma: float = 0.3  # OOD induction
    delta: float = 1.0  # ID gradient isolation
    epsilon: float = 1000.0  # OOD gradient vanishing
    distance: str = "l1"  # of the two distance terms
    kl_direction: str = "official"  # official KL(p_C || p_V); attacker KL(p_V || p_C), a soft-label thief's loss
    pcgrad: bool = True
    pcgrad_reduction: str = "mean"  # over parameters every term touches (the official code can only take the mean)
    bn_mode: str = "mixed"
    max_grad_norm: float = 10.0  # clipping: without PCGrad (official), or after it with clip_pcgrad
    clip_pcgrad: bool = False  # beyond the paper: clip PCGrad's merged gradient too

    def weights(self) -> dict[str, float]:
        return dict(zip(TERMS, (1.0, self.beta, self.gamma, self.delta, self.epsilon), strict=True))

    def active(self) -> list[str]:
        """Terms PCGrad sees: the official code drops those weighted 0."""
        return [t for t, w in self.weights().items() if w != 0]


PAPER = Objective()


# ------------------------------------------------------------------------------------------------ the terms
# Each returns a SUM over the local batch; callers divide by the global batch size, so that under torchrun every
# rank's share adds up to the single-process value.


def centred_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax minus its mean over classes (equal to the logits minus theirs)."""
    log_p = logits.log_softmax(-1)
    return log_p - log_p.mean(-1, keepdim=True)


def distance_sum(victim_logits: torch.Tensor, surrogate_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The distance between V and C per image, summed (docs/method.md, "ID distance" and "OOD induction"):
    l1 = mean_k |C(x) - centred log p_V(x)| with C's raw logits, as the official code compares them;
    kl = KL(p_V || p_C)."""
    if kind == "l1":
        return (surrogate_logits - centred_log_probs(victim_logits)).abs().mean(-1).sum()
    log_v = victim_logits.log_softmax(-1)
    return (log_v.exp() * (log_v - surrogate_logits.log_softmax(-1))).sum()


def divergence_sum(surrogate_logits: torch.Tensor, victim_logits: torch.Tensor, direction: str) -> torch.Tensor:
    """The loss whose surrogate gradient the isolation and vanishing terms shape, summed over images:
    official KL(p_C || p_V); attacker KL(p_V || p_C), the loss a soft-label thief trains its surrogate with."""
    log_c, log_v = surrogate_logits.log_softmax(-1), victim_logits.log_softmax(-1)
    if direction == "official":
        return (log_c.exp() * (log_c - log_v)).sum()
    return (log_v.exp() * (log_v - log_c)).sum()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) / (a.norm() * b.norm()).clamp_min(COSINE_EPS)


# ------------------------------------------------------------------------------------------------ PCGrad


def pcgrad(grads: torch.Tensor, touched: torch.Tensor, generator: torch.Generator, reduction: str) -> torch.Tensor:
    """Official PCGrad on flat per-term gradients (T, P) (docs/method.md, "Merging the terms"): each g_i, in turn,
    visits every g_j (itself included, the originals, in a fresh random order) and loses its projection on g_j when
    g_i . g_j < 0; parameters every term touches get the mean (or sum) of the projected gradients, the others their
    sum."""
    projected = grads.clone()
    for i in range(len(grads)):
        for j in torch.randperm(len(grads), generator=generator).tolist():
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] -= dot * grads[j] / grads[j].norm() ** 2
    shared = touched.all(0)
    merged = projected.sum(0)
    if reduction == "mean":
        merged = torch.where(shared, projected.mean(0), merged)
    return merged


def pcgrad_coefficients(gram: torch.Tensor, generator: torch.Generator, reduction: str) -> torch.Tensor:
    """The same PCGrad from the Gram matrix of the per-term gradients alone: every projected g_i stays a linear
    combination of the originals, so the merged gradient is sum_t c_t g_t. Valid when every term touches every
    parameter. Draws the same random orders as `pcgrad`."""
    gram = gram.to(torch.float64)
    mix = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    for i in range(len(gram)):
        for j in torch.randperm(len(gram), generator=generator).tolist():
            dot = mix[i] @ gram[:, j]
            if dot < 0:
                mix[i, j] -= dot / gram[j, j]
    return mix.mean(0) if reduction == "mean" else mix.sum(0)


# ------------------------------------------------------------------------------------------------ BatchNorm


def forward_id_and_ood(
    victim: nn.Module, x: torch.Tensor, x_ood: torch.Tensor, bn_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The victim's logits on the ID and the OOD batch. joint (beyond the paper): one forward of both, so BatchNorm's
    batch statistics are the ID+OOD mixture, which is also what its running statistics become: the network is
    trained under the normalisation it is deployed with. The other modes: two forwards (`ood_batchnorm`)."""
    if bn_mode == "joint":
        both = victim(torch.cat([x, x_ood]))
        return both[: len(x)], both[len(x) :]
    logits = victim(x)
    with ood_batchnorm(victim, bn_mode):
        return logits, victim(x_ood)


@contextlib.contextmanager
def ood_batchnorm(model: nn.Module, mode: str) -> Iterator[None]:
    """How the victim's BatchNorm treats OOD batches. mixed (official): like ID batches, so the running statistics
    used at test time blend ID and OOD; separate: normalised by their own batch statistics without touching the
    running ones; eval-ood: normalised by the running (ID-only) statistics; joint: ID and OOD go through one forward
    (`forward_id_and_ood`), so this is a no-op."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if mode in ("mixed", "joint") or not norms or not model.training:
        yield
        return
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        if mode == "eval-ood":
            m.eval()
        else:
            m.track_running_stats = False  # train-mode BatchNorm then neither reads nor updates running statistics
    try:
        yield
    finally:
        for m, (training, track) in zip(norms, saved, strict=True):
            m.train(training)
            m.track_running_stats = track


# ------------------------------------------------------------------------------------------------ across ranks


def spread(local: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum over ranks as value, differentiable only through this rank's share (identity on one process)."""
    if ranks.world == 1:
        return local
    total = ranks.sum_(local.detach().clone())
    return local + (total - local.detach())


def global_counts(ranks: Ranks, *counts: int) -> list[float]:
    if ranks.world == 1:
        return [float(c) for c in counts]
    return ranks.sum_(torch.tensor(counts, dtype=torch.float64)).tolist()


def finish(
    terms: dict[str, torch.Tensor], local: Sequence[str], weights: dict[str, float], ranks: Ranks
) -> dict[str, torch.Tensor]:
    """Detached term values summed over ranks where they are local shares, plus the weighted total."""
    out = {k: v.detach() for k, v in terms.items()}
    if ranks.world > 1:
        summed = ranks.sum_(torch.stack([out[k].to(torch.float64) for k in local]))
        out.update(dict(zip(local, summed, strict=True)))
    out["total"] = sum(weights[k] * out[k] for k in TERMS)
    return out


# ------------------------------------------------------------------------------------------------ the merged gradient


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def set_gradients(params: Sequence[torch.Tensor], merged: torch.Tensor) -> None:
    for p, g in zip(params, merged.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p).to(p.dtype).clone()


def clip_(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ on an already flat gradient (same formula)."""
    coef = max_norm / (grad.norm() + 1e-6)
    return grad.mul_(coef) if coef < 1 else grad


class SpikeClip(nn.Module):
    """Beyond the paper (`--clip spike`; docs/method.md, "Clipping"): clip the merged gradient at `factor` times the
    running mean of the norms of the steps before it (after `warmup` steps), AutoClip-style. A broad-preset victim
    died of one such spike: the norm went from ~0.7 to 2.8 then 7.9 within two steps (under the official clip at 10)
    and the last hidden layer's ReLUs all died. The mean (a plain mean over the first 1 / (1 - decay) steps, then
    exponential) lives in buffers, so checkpoints carry it and --resume stays exact; every rank sees the same summed
    gradient, so they agree."""

    def __init__(self, factor: float = SPIKE_FACTOR, decay: float = 0.99, warmup: int = 20):
        super().__init__()
        self.factor, self.decay, self.warmup = factor, decay, warmup
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("clipped", torch.zeros((), dtype=torch.float64))

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        norm = grad.norm().to(torch.float64)
        limit = torch.where(self.steps >= self.warmup, self.factor * self.mean, torch.full_like(norm, float("inf")))
        scale = torch.clamp(limit / (norm + 1e-12), max=1.0)
        self.clipped += (scale < 1).to(torch.float64)
        self.steps += 1
        self.mean += torch.clamp(1 / self.steps, min=1 - self.decay) * (norm * scale - self.mean)
        return grad.mul_(scale.to(grad.dtype))


def clip_merged(merged: torch.Tensor, objective: Objective, spike: Optional[SpikeClip]) -> torch.Tensor:
    """The merged (global) gradient, clipped as asked: at the fixed norm without PCGrad (official) or with
    clip_pcgrad, then at a spike when `spike` is given."""
    if objective.clip_pcgrad or not objective.pcgrad:
        merged = clip_(merged, objective.max_grad_norm)
    return merged if spike is None else spike(merged)

"""InI's objective (Guo et al., "Isolation and Induction", arXiv 2308.00958; INI_SPEC §2): the five loss terms, PCGrad
as the official code merges them, the OOD batch stream, the reference training step (autograd, double backprop
through the frozen surrogate, one backward per term) and `diagnose`, which scores any victim against surrogates.
`_ini_fast.py` holds the production step: the same maths, several times cheaper for LeNet-5.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from stages import _data
from stages._loop import Dist
from stages._ood import OodStream  # noqa: F401 - the steps' OOD batches, part of this module's API

# The loss terms in the order the official code lists them (its PCGrad shuffles positions in this list).
TERMS = ("benign", "id_distance", "ood_distance", "isolation", "vanishing")
DISTANCES = ("l1", "kl")
KL_DIRECTIONS = ("official", "attacker")
BN_MODES = ("mixed", "separate", "eval-ood", "joint")
REDUCTIONS = ("mean", "sum")
COSINE_EPS = 1e-8  # F.cosine_similarity's, as the official isolation term uses


@dataclass(frozen=True)
class Objective:
    """Weights and switches of the InI loss; the defaults are the official run's (INI_SPEC §2)."""

    beta: float = 0.0  # ID distance
    gamma: float = 0.3  # OOD induction
    delta: float = 1.0  # ID gradient isolation
    epsilon: float = 1000.0  # OOD gradient vanishing
    distance: str = "l1"  # of the two distance terms
    kl_direction: str = "official"  # official KL(p_C || p_V); attacker KL(p_V || p_C), a soft-label thief's loss
    pcgrad: bool = True
    reduction: str = "mean"  # of PCGrad over shared parameters (the official code can only take the mean)
    bn_mode: str = "mixed"
    max_grad_norm: float = 10.0  # clipping: without PCGrad (official), or after it with clip_pcgrad
    clip_pcgrad: bool = False  # beyond the paper: clip PCGrad's merged gradient too

    def weights(self) -> dict[str, float]:
        return dict(zip(TERMS, (1.0, self.beta, self.gamma, self.delta, self.epsilon)))

    def active(self) -> list[str]:
        """Terms PCGrad sees: the official code drops those weighted 0."""
        return [t for t, w in self.weights().items() if w != 0]


# ------------------------------------------------------------------------------------------------ the terms
# Each returns a SUM over the local batch; callers divide by the global batch size, so that under torchrun every
# rank's share adds up to the single-process value.


def centred_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax minus its mean over classes (equal to the logits minus theirs)."""
    log_p = logits.log_softmax(-1)
    return log_p - log_p.mean(-1, keepdim=True)


def distance_sum(victim_logits: torch.Tensor, surrogate_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The official distance between V and C per image, summed: l1 = mean_k |C(x) - centred log p_V(x)| with C's
    raw logits, as the official code compares them; kl = KL(p_V || p_C)."""
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
    """Official PCGrad on flat per-term gradients (T, P): each g_i, in turn, visits every g_j (itself included, the
    originals, in a fresh random order) and loses its projection on g_j when g_i . g_j < 0; parameters every term
    touches get the mean (or sum) of the projected gradients, the others their sum."""
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


# ------------------------------------------------------------------------------------------------ data and helpers


def victim_logits(victim: nn.Module, x: torch.Tensor, x_ood: torch.Tensor,
                  bn_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The victim's logits on the ID and the OOD batch. joint (beyond the paper): one forward of both, so BatchNorm's
    batch statistics are the ID+OOD mixture, which is also what its running statistics become: the network is
    trained under the normalisation it is deployed with. The other modes: two forwards (`ood_batchnorm`)."""
    if bn_mode == "joint":
        both = victim(torch.cat([x, x_ood]))
        return both[: len(x)], both[len(x):]
    logits = victim(x)
    with ood_batchnorm(victim, bn_mode):
        return logits, victim(x_ood)


@contextlib.contextmanager
def ood_batchnorm(model: nn.Module, mode: str) -> Iterator[None]:
    """How the victim's BatchNorm treats OOD batches. mixed (official): like ID batches, so the running statistics
    used at test time blend ID and OOD; separate: normalised by their own batch statistics without touching the
    running ones; eval-ood: normalised by the running (ID-only) statistics; joint: ID and OOD go through one forward
    (`victim_logits`), so this is a no-op."""
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
        for m, (training, track) in zip(norms, saved):
            m.train(training)
            m.track_running_stats = track


def spread(local: torch.Tensor, comm: Dist) -> torch.Tensor:
    """The sum over ranks as value, differentiable only through this rank's share (identity on one process)."""
    if comm.world == 1:
        return local
    total = comm.sum_(local.detach().clone())
    return local + (total - local.detach())


def global_counts(comm: Dist, *counts: int) -> list[float]:
    if comm.world == 1:
        return [float(c) for c in counts]
    return comm.sum_(torch.tensor(counts, dtype=torch.float64)).tolist()


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def set_gradients(params: Sequence[torch.Tensor], merged: torch.Tensor) -> None:
    for p, g in zip(params, merged.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype).clone()


def clip_(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ on an already flat gradient (same formula)."""
    coef = max_norm / (grad.norm() + 1e-6)
    return grad.mul_(coef) if coef < 1 else grad


class SpikeClip(nn.Module):
    """Beyond the paper (`--clip spike`): clip the merged gradient at `factor` times the running mean of the norms of
    the steps before it (after `warmup` steps), AutoClip-style. A broad-preset victim died of one such spike: the
    norm went from ~0.7 to 2.8 then 7.9 within two steps (under the official clip at 10) and the last hidden layer's
    ReLUs all died. The mean (a plain mean over the first 1 / (1 - decay) steps, then exponential) lives in buffers,
    so checkpoints carry it and --resume stays exact; every rank sees the same summed gradient, so they agree."""

    def __init__(self, factor: float = 2.0, decay: float = 0.99, warmup: int = 20):
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


def finish(terms: dict[str, torch.Tensor], local: Sequence[str], weights: dict[str, float],
           comm: Dist) -> dict[str, torch.Tensor]:
    """Detached term values summed over ranks where they are local shares, plus the weighted total."""
    out = {k: v.detach() for k, v in terms.items()}
    if comm.world > 1:
        summed = comm.sum_(torch.stack([out[k].to(torch.float64) for k in local]))
        out.update({k: v for k, v in zip(local, summed)})
    out["total"] = sum(weights[k] * out[k] for k in TERMS)
    return out


# ------------------------------------------------------------------------------------------------ reference step


class ReferenceStep:
    """The InI step written the straightforward way, as the official code computes it: gradients of the divergence
    with respect to every surrogate parameter built with create_graph=True, one backward pass per term for PCGrad.
    With several surrogates every surrogate term is their mean."""

    reduces_gradients = True  # it sums gradients over ranks itself (PCGrad needs each term's global gradient)

    def __init__(self, victim: nn.Module, surrogates: Sequence[nn.Module], ood: OodStream, objective: Objective,
                 comm: Dist, spike: Optional[SpikeClip] = None):
        self.victim, self.surrogates, self.ood = victim, list(surrogates), ood
        self.objective, self.comm, self.spike = objective, comm, spike

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        obj, comm, k = self.objective, self.comm, len(self.surrogates)
        x_ood = self.ood.next(generator, x, y)
        n, n_ood = global_counts(comm, len(x), len(x_ood))
        logits, logits_ood = victim_logits(self.victim, x, x_ood, obj.bn_mode)
        terms = {"benign": F.cross_entropy(logits, y, reduction="sum") / n}
        terms.update({t: logits.new_zeros(()) for t in TERMS[1:]})
        for surrogate in self.surrogates:
            phi = {name: p.detach().requires_grad_() for name, p in surrogate.named_parameters()}
            call = lambda images: functional_call(surrogate, phi, (images,))  # noqa: E731
            s_logits, s_logits_ood = call(x), call(x_ood)
            terms["id_distance"] = terms["id_distance"] - distance_sum(logits, s_logits.detach(), obj.distance) / n / k
            terms["ood_distance"] = (terms["ood_distance"]
                                     + distance_sum(logits_ood, s_logits_ood.detach(), obj.distance) / n_ood / k)
            adversary = divergence_sum(s_logits, logits, obj.kl_direction) / n
            g_adv = flat(torch.autograd.grad(adversary, list(phi.values()), create_graph=True))
            expected = F.cross_entropy(s_logits, y, reduction="sum") / n
            g_exp = flat(torch.autograd.grad(expected, list(phi.values()))).detach()
            terms["isolation"] = terms["isolation"] + cosine(spread(g_adv, comm), comm.sum_(g_exp)) / k
            adversary_ood = divergence_sum(s_logits_ood, logits_ood, obj.kl_direction) / n_ood
            g_ood = flat(torch.autograd.grad(adversary_ood, list(phi.values()), create_graph=True))
            terms["vanishing"] = terms["vanishing"] + spread(g_ood, comm).abs().mean() / k

        params = [p for p in self.victim.parameters() if p.requires_grad]
        weights = obj.weights()
        if obj.pcgrad:
            grads, touched = [], []
            for t in obj.active():
                g = torch.autograd.grad(weights[t] * terms[t], params, retain_graph=True, allow_unused=True)
                grads.append(flat([torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]))
                touched.append(flat([torch.full_like(p, gi is not None, dtype=torch.bool) for p, gi in zip(params, g)]))
            merged = pcgrad(comm.sum_(torch.stack(grads)), torch.stack(touched), generator, obj.reduction)
        else:
            total = sum(weights[t] * terms[t] for t in TERMS)
            g = torch.autograd.grad(total, params, allow_unused=True)
            merged = comm.sum_(flat([torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]))
        set_gradients(params, clip_merged(merged, obj, self.spike))
        return finish(terms, ("benign", "id_distance", "ood_distance"), weights, comm)


# ------------------------------------------------------------------------------------------------ diagnostics


def diagnose(victim: nn.Module, surrogates: Sequence[nn.Module], id_images: torch.Tensor, id_labels: torch.Tensor,
             ood_images: torch.Tensor, device: str, batch_size: int = 128,
             kl_direction: str = "official") -> dict[str, float]:
    """Two held-out measures of what InI aims at, averaged over surrogates (frozen, eval mode):
    ood_l1: mean |centred log p_V - centred log p_C| over OOD images and classes (induction: lower = V mimics C);
    id_cosine: mean over ID batches of cos(grad_phi divergence(C, V), grad_phi CE(C(x), y)) (isolation: lower =
    a thief's gradient points away from the one the true labels would give)."""
    from stages import _ini_fast  # it builds on this module

    was_training = victim.training
    victim.eval()
    l1_sum, cos_sum, cos_weight = 0.0, 0.0, 0.0
    for surrogate in surrogates:
        params = [p for p in surrogate.parameters()]
        with torch.no_grad():
            for idx in _data.batches(len(ood_images), 1024):
                xo = _data.to_float(ood_images[idx].to(device))
                l1_sum += float((centred_log_probs(victim(xo)) - centred_log_probs(surrogate(xo))).abs().mean(-1).sum())
        for idx in _data.batches(len(id_images), batch_size):
            x, y = _data.to_float(id_images[idx].to(device)), id_labels[idx].to(device)
            with torch.no_grad():
                v = victim(x)
            with torch.enable_grad():
                if _ini_fast.supports(surrogate, x.shape[-1]):  # both gradients from one pass of the LeNet-5 tape
                    tape = _ini_fast.Tape(surrogate, x)
                    s = tape.z.requires_grad_()
                    u = torch.autograd.grad(divergence_sum(s, v, kl_direction) / len(x), s)[0]
                    e = torch.autograd.grad(F.cross_entropy(s, y), s)[0]
                    grads = tape.vjp(torch.stack([u, e], 1))
                    g_adv, g_exp = flat([g[0] for g in grads]), flat([g[1] for g in grads])
                else:
                    phi = [p.detach().requires_grad_() for p in params]
                    s = functional_call(surrogate, dict(zip([n for n, _ in surrogate.named_parameters()], phi)), (x,))
                    adversary = divergence_sum(s, v, kl_direction) / len(x)
                    g_adv = flat(torch.autograd.grad(adversary, phi, retain_graph=True))
                    g_exp = flat(torch.autograd.grad(F.cross_entropy(s, y), phi))
            cos_sum += float(cosine(g_adv, g_exp)) * len(x)
            cos_weight += len(x)
    victim.train(was_training)
    k = max(1, len(surrogates))
    return {"ood_l1": l1_sum / max(1, len(ood_images)) / k, "id_cosine": cos_sum / max(1.0, cos_weight)}

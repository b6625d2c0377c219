"""InI's frozen surrogates (docs/method.md, "The frozen surrogates"): randomly initialised networks the victim's
answers are shaped against (the paper calls one the "clone"), seeded from `--seed`, and refreshed during training
when asked (beyond the paper): re-initialised, or distilled briefly from the victim's OOD answers."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from stages.data import prepared as _data
from stages.training import victim as _victim

# "distill" refresh: a few SGD steps of KL(p_V || p_C) on OOD images, KnockoffNets' loss at a gentle rate.
DISTILL_LR, DISTILL_MOMENTUM, DISTILL_WD = 0.01, 0.9, 5e-4
HELD_OUT = -1  # index of the surrogate never trained against: the held-out diagnostics'


def seed_of(seed: int, index: int, generation: int = 0) -> int:
    """Seed of surrogate `index` (HELD_OUT: the held-out one) in refresh `generation`, derived from --seed."""
    return (seed * 1_000_003 + 7_919 * (index + 2) + 104_729 * generation) % (2**63)


def build(arch: str, data: _data.Dataset, seed: int, index: int, generation: int = 0) -> torch.nn.Module:
    """A randomly initialised network, frozen in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(seed, index, generation))
        net = _victim.build_for(arch, data)
    return net.eval().requires_grad_(False)


def refresh(
    nets: Sequence[torch.nn.Module],
    archs: Sequence[str],
    how: str,
    epoch: int,
    data: _data.Dataset,
    seed: int,
    victim: torch.nn.Module,
    ood_images: torch.Tensor,
    steps: int,
    batch_size: int,
    gen: torch.Generator,
) -> None:
    """New surrogates for the epoch starting: reinit draws generation `epoch` of each; distill trains each briefly
    on the victim's answers to OOD images."""
    if how == "reinit":
        for j, (net, arch) in enumerate(zip(nets, archs, strict=True)):
            net.load_state_dict(build(arch, data, seed, j, generation=epoch).state_dict())
    else:
        distill(nets, victim, ood_images, steps, batch_size, gen)


def distill(
    nets: Sequence[torch.nn.Module],
    victim: torch.nn.Module,
    ood_images: torch.Tensor,
    steps: int,
    batch_size: int,
    gen: torch.Generator,
) -> None:
    """Train each surrogate for `steps` SGD steps to match the victim's probabilities on OOD images, as a thief
    querying with OOD data would (soft labels, KL(p_V || p_C)); then freeze it again."""
    was_training = victim.training
    victim.eval()
    for net in nets:
        net.train().requires_grad_(True)
        opt = torch.optim.SGD(net.parameters(), lr=DISTILL_LR, momentum=DISTILL_MOMENTUM, weight_decay=DISTILL_WD)
        for _ in range(steps):
            idx = torch.randint(len(ood_images), (batch_size,), generator=gen)
            x = _data.to_float(ood_images[idx.to(ood_images.device)])
            with torch.no_grad():
                target = victim(x).softmax(-1)
            loss = F.kl_div(net(x).log_softmax(-1), target, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval().requires_grad_(False)
    victim.train(was_training)

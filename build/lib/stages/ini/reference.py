"""The InI step written the straightforward way, as the official code computes it (docs/method.md, "The
objective"): gradients of the divergence with respect to every surrogate parameter built with create_graph=True,
one backward pass per term for PCGrad. The readable definition `fast.py` is tested equal to."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from stages.ini.objective import (
    TERMS,
    Objective,
    SpikeClip,
    clip_merged,
    cosine,
    distance_sum,
    divergence_sum,
    finish,
    flat,
    forward_id_and_ood,
    global_counts,
    pcgrad,
    set_gradients,
    spread,
)
from stages.ini.ood import OodStream
from stages.training.torchrun import Ranks


class ReferenceStep:
    """One InI step on an ID batch and the next OOD batch: the terms' values, gradients left in the victim's
    `.grad`. With several surrogates every surrogate term is their mean."""

    reduces_gradients = True  # it sums gradients over ranks itself (PCGrad needs each term's global gradient)

    def __init__(
        self,
        victim: nn.Module,
        surrogates: Sequence[nn.Module],
        ood: OodStream,
        objective: Objective,
        ranks: Ranks,
        spike: Optional[SpikeClip] = None,
    ):
        self.victim, self.surrogates, self.ood = victim, list(surrogates), ood
        self.objective, self.ranks, self.spike = objective, ranks, spike

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        obj, ranks, k = self.objective, self.ranks, len(self.surrogates)
        x_ood = self.ood.next(generator, x, y)
        n, n_ood = global_counts(ranks, len(x), len(x_ood))
        logits, logits_ood = forward_id_and_ood(self.victim, x, x_ood, obj.bn_mode)
        terms = {"benign": F.cross_entropy(logits, y, reduction="sum") / n}
        terms.update({t: logits.new_zeros(()) for t in TERMS[1:]})
        for surrogate in self.surrogates:
            phi = {name: p.detach().requires_grad_() for name, p in surrogate.named_parameters()}

            def call(images, surrogate=surrogate, phi=phi):
                return functional_call(surrogate, phi, (images,))

            s_logits, s_logits_ood = call(x), call(x_ood)
            terms["id_distance"] = terms["id_distance"] - distance_sum(logits, s_logits.detach(), obj.distance) / n / k
            terms["ood_distance"] = (
                terms["ood_distance"] + distance_sum(logits_ood, s_logits_ood.detach(), obj.distance) / n_ood / k
            )
            adversary = divergence_sum(s_logits, logits, obj.kl_direction) / n
            g_adv = flat(torch.autograd.grad(adversary, list(phi.values()), create_graph=True))
            expected = F.cross_entropy(s_logits, y, reduction="sum") / n
            g_exp = flat(torch.autograd.grad(expected, list(phi.values()))).detach()
            terms["isolation"] = terms["isolation"] + cosine(spread(g_adv, ranks), ranks.sum_(g_exp)) / k
            adversary_ood = divergence_sum(s_logits_ood, logits_ood, obj.kl_direction) / n_ood
            g_ood = flat(torch.autograd.grad(adversary_ood, list(phi.values()), create_graph=True))
            terms["vanishing"] = terms["vanishing"] + spread(g_ood, ranks).abs().mean() / k

        params = [p for p in self.victim.parameters() if p.requires_grad]
        weights = obj.weights()
        if obj.pcgrad:
            grads, touched = [], []
            for t in obj.active():
                g = torch.autograd.grad(weights[t] * terms[t], params, retain_graph=True, allow_unused=True)
                grads.append(flat([torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g, strict=True)]))
                touched.append(
                    flat(
                        [torch.full_like(p, gi is not None, dtype=torch.bool) for p, gi in zip(params, g, strict=True)]
                    )
                )
            merged = pcgrad(ranks.sum_(torch.stack(grads)), torch.stack(touched), generator, obj.pcgrad_reduction)
        else:
            total = sum(weights[t] * terms[t] for t in TERMS)
            g = torch.autograd.grad(total, params, allow_unused=True)
            merged = ranks.sum_(
                flat([torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g, strict=True)])
            )
        set_gradients(params, clip_merged(merged, obj, self.spike))
        return finish(terms, ("benign", "id_distance", "ood_distance"), weights, ranks)

"""Two held-out measures of what InI aims at (docs/method.md, "Diagnostics"), for any victim against frozen
surrogates: how closely the victim's answers on OOD images follow a surrogate's (induction), and where a thief's
distillation gradient points on ID images against the true labels' (isolation)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from stages.data import prepared as _data
from stages.ini import fast, surrogates
from stages.ini.objective import centred_log_probs, cosine, divergence_sum, flat
from stages.training import victim as _victim


def diagnose(
    victim: nn.Module,
    nets: Sequence[nn.Module],
    id_images: torch.Tensor,
    id_labels: torch.Tensor,
    ood_images: torch.Tensor,
    device: str,
    batch_size: int = 128,
    kl_direction: str = "official",
) -> dict[str, float]:
    """Averaged over the surrogates `nets` (frozen, eval mode):
    ood_l1: mean |centred log p_V - centred log p_C| over OOD images and classes (induction: lower = V mimics C);
    id_cosine: mean over ID batches of cos(grad_phi divergence(C, V), grad_phi CE(C(x), y)) (isolation: lower =
    a thief's gradient points away from the one the true labels would give)."""
    was_training = victim.training
    victim.eval()
    l1_sum, cos_sum, cos_weight = 0.0, 0.0, 0.0
    for surrogate in nets:
        params = list(surrogate.parameters())
        with torch.no_grad():
            for idx in _data.batches(len(ood_images), 1024):
                xo = _data.to_float(ood_images[idx].to(device))
                l1_sum += float((centred_log_probs(victim(xo)) - centred_log_probs(surrogate(xo))).abs().mean(-1).sum())
        for idx in _data.batches(len(id_images), batch_size):
            x, y = _data.to_float(id_images[idx].to(device)), id_labels[idx].to(device)
            with torch.no_grad():
                v = victim(x)
            with torch.enable_grad():
                if fast.supports(surrogate, x.shape[-1]):  # both gradients from one pass of the LeNet-5 tape
                    tape = fast.Tape(surrogate, x)
                    s = tape.z.requires_grad_()
                    u = torch.autograd.grad(divergence_sum(s, v, kl_direction) / len(x), s)[0]
                    e = torch.autograd.grad(F.cross_entropy(s, y), s)[0]
                    grads = tape.vjp(torch.stack([u, e], 1))
                    g_adv, g_exp = flat([g[0] for g in grads]), flat([g[1] for g in grads])
                else:
                    phi = [p.detach().requires_grad_() for p in params]
                    names = [n for n, _ in surrogate.named_parameters()]
                    s = functional_call(surrogate, dict(zip(names, phi, strict=True)), (x,))
                    adversary = divergence_sum(s, v, kl_direction) / len(x)
                    g_adv = flat(torch.autograd.grad(adversary, phi, retain_graph=True))
                    g_exp = flat(torch.autograd.grad(F.cross_entropy(s, y), phi))
            cos_sum += float(cosine(g_adv, g_exp)) * len(x)
            cos_weight += len(x)
    victim.train(was_training)
    k = max(1, len(nets))
    return {"ood_l1": l1_sum / max(1, len(ood_images)) / k, "id_cosine": cos_sum / max(1.0, cos_weight)}


def diagnose_victim(
    victim_path: Path, dataset: str, ood: str, seed: int = 0, count: int = 1, images: int = 2048, device: str = "cpu"
) -> dict[str, float]:
    """The per-epoch diagnostics for any victim (an undefended one too), against the `count` surrogates train-ini
    would build with `seed` and the held-out one: comparable numbers for defended and undefended victims."""
    victim, info = _victim.load(Path(victim_path), device)
    data = _data.load(dataset)
    _victim.check_matches(info, data)
    ood_data = _data.load(ood, splits=("test",))
    val_x, val_y = (t[:images] for t in data.splits["val"])
    ood_test = _data.fit_images(ood_data.splits["test"][0][:images], data.shape)
    row = {}
    groups = (
        ("", [surrogates.build(info.arch, data, seed, j).to(device) for j in range(count)]),
        ("_fresh", [surrogates.build(info.arch, data, seed, surrogates.HELD_OUT).to(device)]),
    )
    for tag, group in groups:
        scores = diagnose(victim, group, val_x, val_y, ood_test, device)
        row.update({f"diag_{k}{tag}": v for k, v in scores.items()})
    return row

"""Train an undefended victim (the baseline InI is compared with) and write `victim.h5`.

Reads a prepared dataset; writes weights, per-epoch history and the val-chosen epoch. The default recipe is
InI's own (SGD lr 0.1, momentum 0.5, wd 1e-3, StepLR 20), so baseline and defense compare like with like.
`--objective outlier-exposure --ood D` trains the victim Adaptive Misinformation needs (Hendrycks et al., 2019)
and, in the same run, its misinformation network (Kariyappa & Qureshi, 2020), stored beside the weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
import typer
from torch import nn

import models
from models.params import UserError
from stages.core import options as _options
from stages.core.artifacts import prepare_output
from stages.core.options import DATA, RECIPE, RUNTIME
from stages.data import prepared as _data
from stages.deploy import defense as _defense
from stages.training import loop as _loop
from stages.training import victim as _victim


def run(
    dataset: _options.Dataset = "mnist",
    ood: Annotated[
        Optional[str],
        typer.Option(
            help="Prepared OOD dataset (.h5) or name for outlier exposure; converted to the victim's input.",
            rich_help_panel=DATA,
        ),
    ] = None,
    arch: _options.Arch = "lenet5",
    objective: Annotated[
        Literal["ce", "outlier-exposure"],
        typer.Option(
            help="ce, or outlier-exposure: CE + uniform-CE on --ood batches, plus a misinformation network.",
            rich_help_panel=RECIPE,
        ),
    ] = "ce",
    epochs: _options.Epochs = 10,
    batch_size: _options.BatchSize = _options.PAPER_SGD.batch_size,
    lr: _options.LR = _options.PAPER_SGD.lr,
    momentum: _options.Momentum = _options.PAPER_SGD.momentum,
    weight_decay: _options.WeightDecay = _options.PAPER_SGD.weight_decay,
    lr_step: _options.LRStep = _options.PAPER_SGD.lr_step,
    lr_gamma: _options.LRGamma = _options.PAPER_SGD.lr_gamma,
    seed: _options.Seed = 0,
    augment: _options.Augment = None,
    out: Annotated[Path, typer.Option(help="Output victim HDF5.", rich_help_panel=RUNTIME)] = Path(
        "artifacts/victim.h5"
    ),
    device: _options.Device = "auto",
    resume: _options.Resume = False,
) -> Path:
    """Train an undefended victim with cross-entropy (or outlier exposure); choose the epoch on val."""
    params = dict(locals())
    started = time.time()
    models.check_arch(arch)
    if objective == "outlier-exposure" and ood is None:
        raise UserError("--objective outlier-exposure needs --ood DATASET")
    if objective == "ce" and ood is not None:
        raise UserError("--ood only applies to --objective outlier-exposure")
    if ood is not None:
        _data.refuse_evaluation_only(ood, "--ood")
    out = prepare_output(out)
    data = _data.load(dataset)
    recipe = _loop.VictimRecipe.of(params, data)
    params.update(dataset=str(data.path), device=recipe.device, augment=recipe.augment)

    torch.manual_seed(seed)
    model = _victim.build_for(arch, data).to(recipe.device)

    def step(x, y, _gen):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return {"loss": loss.detach()}

    inputs, extra = [data.path], {}
    if objective == "ce":
        result = _loop.fit(model, data, step, recipe, out, _loop.fingerprint(params), resume, title="train")
    else:
        ood_data = _data.load(ood, splits=("train",))
        params["ood"] = str(ood_data.path)
        pair = _WithMisinformation(model, _victim.build_for(arch, data)).to(recipe.device)
        ood_step, begin_epoch = _outlier_exposure(
            pair, _data.fit_images(ood_data.splits["train"][0], data.shape), recipe
        )
        result = _loop.fit(
            pair,
            data,
            ood_step,
            recipe,
            out,
            _loop.fingerprint(params),
            resume,
            begin_epoch=begin_epoch,
            title="train (outlier exposure)",
        )
        inputs, extra = [data.path, ood_data.path], {_defense.MISINFORMATION_GROUP: pair.misinformation}
    _victim.save(
        out,
        model,
        arch=arch,
        data=data,
        objective=objective,
        result=result,
        stage="train",
        params=params,
        recipe=recipe_identity(params, data.shape[0]),
        inputs=inputs,
        seed=seed,
        started=started,
        extra=extra,
    )
    _loop.checkpoint_path(out).unlink(missing_ok=True)
    _loop.summarise(
        f"train {arch} on {data.name}" + ("" if objective == "ce" else f" ({objective})"), data, result, out
    )
    return out


def recipe_identity(params: dict, channels: int) -> tuple[dict, dict]:
    """The recipe identity (`_victim.identity`) of a victim `train` made with these flags, on images of
    `channels` channels (augmentation's default depends on them)."""
    defaults = {**_options.defaults(run), "augment": channels == 3}
    return _victim.identity(params.get("objective", "ce"), params, defaults)


OE_WEIGHT = 1.0  # lambda of outlier exposure, as Adaptive Misinformation trains its victim


class _WithMisinformation(nn.Module):
    """The victim and its misinformation network, trained and selected (on the victim's val accuracy) together."""

    def __init__(self, victim: nn.Module, misinformation: nn.Module):
        super().__init__()
        self.victim = victim
        self.misinformation = misinformation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.victim(x)


def _outlier_exposure(pair: _WithMisinformation, ood_images: torch.Tensor, recipe: _loop.VictimRecipe):
    """Step: CE(V(x), y) + lambda * CE(V(x_ood), uniform) for the victim; CE(log(1 - softmax(M(x))), y) for M."""
    if len(ood_images) == 0:
        raise UserError("--ood dataset has no training images")
    ood_images = ood_images.to(recipe.device)
    order = {"perm": torch.arange(len(ood_images)), "next": 0}

    def begin_epoch(_epoch, gen):
        order["perm"], order["next"] = torch.randperm(len(ood_images), generator=gen), 0

    def next_ood(n):
        perm, start = order["perm"], order["next"]
        idx = perm[(start + torch.arange(n)) % len(perm)]  # cycle when the OOD set is smaller than an epoch
        order["next"] = (start + n) % len(perm)
        return _data.to_float(ood_images[idx.to(ood_images.device)])

    def step(x, y, gen):
        x_ood = next_ood(len(x))
        if recipe.augment:
            x_ood = _data.augment_crop_flip(x_ood, gen)
        benign = F.cross_entropy(pair.victim(x), y)
        uniform = -torch.log_softmax(pair.victim(x_ood), dim=1).mean()
        logits = pair.misinformation(x)
        # log(1 - p_y) = logsumexp over the other classes - logsumexp over all, computed without cancellation
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        misinformation = -(torch.logsumexp(others, 1) - torch.logsumexp(logits, 1)).mean()
        (benign + OE_WEIGHT * uniform + misinformation).backward()
        return {"loss": benign.detach(), "oe_loss": uniform.detach(), "misinformation_loss": misinformation.detach()}

    return step, begin_epoch

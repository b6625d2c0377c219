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
from rich.console import Console
from rich.table import Table

import models
from stages import _data, _defense, _loop, _victim
from stages._artifacts import UserError, prepare_output

console = Console(stderr=True)


def run(
    dataset: Annotated[str, typer.Option(help="Prepared dataset (.h5) or dataset name.")] = "mnist",
    arch: Annotated[str, typer.Option(help=f"Architecture: {', '.join(models.MODELS)}.")] = "lenet5",
    out: Annotated[Path, typer.Option(help="Output victim HDF5.")] = Path("artifacts/victim.h5"),
    epochs: _loop.Epochs = 10,
    batch_size: _loop.BatchSize = 128,
    lr: _loop.LR = 0.1,
    momentum: _loop.Momentum = 0.5,
    weight_decay: _loop.WeightDecay = 1e-3,
    lr_step: _loop.LRStep = 20,
    lr_gamma: _loop.LRGamma = 0.1,
    seed: _loop.Seed = 0,
    device: _loop.Device = "auto",
    augment: _loop.Augment = None,
    resume: _loop.Resume = False,
    objective: Annotated[Literal["ce", "outlier-exposure"], typer.Option(
        help="ce, or outlier-exposure: CE + uniform-CE on --ood batches, plus a misinformation network.")] = "ce",
    ood: Annotated[Optional[str], typer.Option(
        help="Prepared OOD dataset (.h5) or name for outlier exposure; converted to the victim's input.")] = None,
) -> Path:
    """Train an undefended victim with cross-entropy (or outlier exposure); choose the epoch on val."""
    started = time.time()
    params = dict(locals())
    params.pop("started")
    if arch not in models.MODELS:
        raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(models.MODELS)}")
    if objective == "outlier-exposure" and ood is None:
        raise UserError("--objective outlier-exposure needs --ood DATASET")
    if objective == "ce" and ood is not None:
        raise UserError("--ood only applies to --objective outlier-exposure")
    if ood is not None:
        _data.refuse_evaluation_only(ood, "--ood")
    out = prepare_output(out)
    data = _data.load(dataset)
    recipe = _loop.Recipe(epochs, batch_size, lr, momentum, weight_decay, lr_step, lr_gamma, seed,
                          _loop.pick_device(device), data.shape[0] == 3 if augment is None else augment)
    params.update(dataset=str(data.path), device=recipe.device, augment=recipe.augment)

    torch.manual_seed(seed)
    model = _victim.build_for(arch, data).to(recipe.device)

    def step(x, y, _gen):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return {"loss": loss.detach()}

    if objective == "ce":
        result = _loop.fit(model, data, step, recipe, out, _loop.fingerprint(params), resume, title="train")
        _victim.save(out, model, arch, data, "ce", result, "train", params, [data.path], seed, started)
    else:
        ood_data = _data.load(ood, splits=("train",))
        params["ood"] = str(ood_data.path)
        pair = _WithMisinformation(model, _victim.build_for(arch, data)).to(recipe.device)
        ood_step, begin_epoch = _outlier_exposure(pair, _data.fit_images(ood_data.splits["train"][0], data.shape), recipe)
        result = _loop.fit(pair, data, ood_step, recipe, out, _loop.fingerprint(params), resume,
                           begin_epoch=begin_epoch, title="train (outlier exposure)")
        _victim.save(out, pair.victim, arch, data, objective, result, "train", params, [data.path, ood_data.path], seed,
                     started, extra={_defense.MISINFORMATION_GROUP: pair.misinformation})
    _loop.checkpoint_path(out).unlink(missing_ok=True)
    summarise(f"train {arch} on {data.name}" + ("" if objective == "ce" else f" ({objective})"), data, result, out)
    return out


OE_WEIGHT = 1.0  # lambda of outlier exposure, as Adaptive Misinformation trains its victim


class _WithMisinformation(nn.Module):
    """The victim and its misinformation network, trained and selected (on the victim's val accuracy) together."""

    def __init__(self, victim: nn.Module, misinformation: nn.Module):
        super().__init__()
        self.victim = victim
        self.misinformation = misinformation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.victim(x)


def _outlier_exposure(pair: _WithMisinformation, ood_images: torch.Tensor, recipe: _loop.Recipe):
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


def summarise(title: str, data: _data.Dataset, result: _loop.Result, out: Path) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    for split in _data.SPLITS:
        table.add_row(f"{split} images", f"{len(data.splits[split][1]):,}")
    table.add_row("chosen epoch (val)", f"{result.chosen_epoch} / {len(result.history.get('val_accuracy', []))}")
    table.add_row("val accuracy", f"{result.val_accuracy:.2%}")
    table.add_row("test accuracy", f"{result.test_accuracy:.2%}")
    table.add_row("train time", f"{result.seconds:.1f} s")
    table.add_row("victim", f"{out} ({out.stat().st_size / 1e6:.2f} MB)")
    console.print(table)
    rolled = int(sum(result.history.get("rolled_back", [])))
    if rolled:
        console.print(f"note: the network collapsed {rolled} time(s) and was rolled back to its best epoch each time, "
                      f"with the learning rate halved (history column rolled_back)")
    collapsed = collapse_epoch(result.history.get("val_accuracy", []), len(data.classes))
    if collapsed:
        console.print(f"warning: val accuracy fell to chance at epoch {collapsed} and stayed there (the network "
                      f"collapsed); the victim is epoch {result.chosen_epoch}'s. Try a lower --lr or another seed.")


def collapse_epoch(val_accuracy: list[float], num_classes: int) -> int:
    """The 1-based epoch from which val accuracy stayed at chance (under 1.5 / classes) after having been at least
    twice that, or 0."""
    chance = _loop.chance_level(num_classes)
    best, start = 0.0, 0
    for i, acc in enumerate(val_accuracy):
        if acc >= chance:
            start = 0
        elif not start and best >= 2 * chance:
            start = i + 1
        best = max(best, acc)
    return start

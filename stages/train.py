"""Train an undefended victim (the baseline InI is compared with) and write `victim.h5`.

Reads a prepared dataset; writes weights, per-epoch history and the val-chosen epoch. The default recipe is
InI's own (SGD lr 0.1, momentum 0.5, wd 1e-3, StepLR 20), so baseline and defense compare like with like.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table

import models
from stages import _data, _loop, _victim
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
) -> Path:
    """Train an undefended victim with cross-entropy; choose the epoch on val."""
    started = time.time()
    params = dict(locals())
    params.pop("started")
    if arch not in models.MODELS:
        raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(models.MODELS)}")
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

    result = _loop.fit(model, data, step, recipe, out, _loop.fingerprint(params), resume, title="train")
    _victim.save(out, model, arch, data, "ce", result, "train", params, [data.path], seed, started)
    _loop.checkpoint_path(out).unlink(missing_ok=True)
    summarise(f"train {arch} on {data.name}", data, result, out)
    return out


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

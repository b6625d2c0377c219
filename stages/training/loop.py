"""The training loop shared by `train` and `train-ini`: SGD + StepLR, per-epoch val/test, model selection on
val only, an atomic checkpoint after every epoch, exact `--resume`, a stop on a non-finite loss, and (on request) a
rollback when the network collapses to chance; then the summary table both stages print."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from models.params import UserError
from stages.core.artifacts import load_history, load_state, open_artifact, save_history, save_state, write_artifact
from stages.data import prepared as _data
from stages.training import torchrun as _torchrun
from stages.training.torchrun import Ranks

console = Console(stderr=True, log_path=False)

# step(x, y, epoch_generator) -> named loss terms; it leaves gradients in .grad, the loop zeroes and steps.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class VictimRecipe:
    """How a victim is trained, resolved from the stage's flags (whose defaults are the stage's)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_step: int
    lr_gamma: float
    seed: int
    device: str
    augment: bool

    @classmethod
    def of(cls, flags: dict[str, Any], data: _data.Dataset) -> "VictimRecipe":
        """The recipe from the flags of `train` or `train-ini` (one definition for both): the device picked, and
        augmentation on for RGB data unless --augment/--no-augment said otherwise."""
        shared = {f.name: flags[f.name] for f in dataclasses.fields(cls) if f.name not in ("device", "augment")}
        augment = data.shape[0] == 3 if flags["augment"] is None else flags["augment"]
        return cls(**shared, device=pick_device(flags["device"]), augment=augment)


def progress_bar(console: Console, enabled: bool = True) -> Progress:
    """The progress display of the long stages, on stderr: what runs, a bar, done of total, elapsed, left, a note
    (the task's `info` field)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
    )


@dataclass
class Result:
    history: dict[str, list[float]] = field(default_factory=dict)
    chosen_epoch: int = 0
    val_accuracy: float = 0.0
    test_accuracy: float = 0.0
    seconds: float = 0.0


def pick_device(device: str) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{int(os.environ['LOCAL_RANK']) % max(1, torch.cuda.device_count())}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation draw from a generator fixed by (seed, epoch), so a resumed run replays exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str, batch: int = 1024
) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for idx in _data.batches(len(images), batch):
        x = _data.to_float(images[idx].to(device))
        correct += int((model(x).argmax(1) == labels[idx].to(device)).sum())
    model.train(was_training)
    return correct / max(1, len(images))


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.stem + ".ckpt.h5")


def _write_checkpoint(path, fingerprint, epoch, model, optimizer, modules, best, result) -> None:
    with write_artifact(path, "checkpoint", "checkpoint", {"fingerprint": fingerprint}) as f:
        f.attrs["epoch"] = epoch
        f.attrs["chosen_epoch"] = result.chosen_epoch
        f.attrs["val_accuracy"] = result.val_accuracy
        f.attrs["test_accuracy"] = result.test_accuracy
        f.attrs["seconds"] = result.seconds
        save_state(f.create_group("model"), model.state_dict())
        save_state(f.create_group("best"), best)
        momentum = f.create_group("momentum")
        for i, p in enumerate(optimizer.param_groups[0]["params"]):
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                momentum.create_dataset(str(i), data=buf.detach().cpu().numpy())
        for name, module in modules.items():
            save_state(f.create_group(f"modules/{name}"), module.state_dict())
        save_history(f.create_group("history"), result.history)


def _read_checkpoint(path, fingerprint, model, optimizer, modules, device):
    try:
        return _read_checkpoint_unchecked(path, fingerprint, model, optimizer, modules, device)
    except (KeyError, ValueError, TypeError, RuntimeError, OSError) as e:  # a damaged or hand-edited checkpoint
        raise UserError(
            f"{path}: damaged checkpoint ({' '.join(str(e).split())[:200]}); remove it or drop --resume"
        ) from None


def _read_checkpoint_unchecked(path, fingerprint, model, optimizer, modules, device):
    with open_artifact(path, "checkpoint") as f:
        if json.loads(f.attrs["params"])["fingerprint"] != fingerprint:
            raise UserError(f"{path}: checkpoint was made with other parameters; remove it or drop --resume")
        model.load_state_dict(load_state(f["model"]))
        best = load_state(f["best"])
        params = optimizer.param_groups[0]["params"]
        for key in f["momentum"]:
            optimizer.state[params[int(key)]]["momentum_buffer"] = torch.from_numpy(f["momentum"][key][()]).to(device)
        for name, module in modules.items():
            module.load_state_dict(load_state(f[f"modules/{name}"]))
        result = Result(
            load_history(f["history"]),
            int(f.attrs["chosen_epoch"]),
            float(f.attrs["val_accuracy"]),
            float(f.attrs["test_accuracy"]),
            float(f.attrs["seconds"]),
        )
        return int(f.attrs["epoch"]), best, result


def fit(
    model: torch.nn.Module,
    data: _data.Dataset,
    step: Step,
    recipe: VictimRecipe,
    out: Path,
    fingerprint: str,
    resume: bool = False,
    modules: Optional[dict[str, torch.nn.Module]] = None,
    begin_epoch: Optional[Callable[[int, torch.Generator], None]] = None,
    diagnostics: Optional[Callable[[], dict[str, float]]] = None,
    title: str = "train",
    rollbacks: int = 0,
) -> Result:
    """Train `model` in place; on return it holds the weights of the epoch with the best val accuracy.

    With `rollbacks` > 0, an epoch that ends with val accuracy at chance after a good one (a collapse: every ReLU
    dead, one class for everything, from which SGD does not come back) restores the best epoch's weights, drops the
    momentum and halves the learning rate from then on, at most `rollbacks` times. History column `rolled_back`
    records it; the learning rate is a function of that history, so `--resume` stays exact.

    Under torchrun every rank runs this loop on its shard of each batch. A step that sums its gradients over ranks
    itself says so with a true `step.reduces_gradients`; otherwise the loop averages them, as DDP would."""
    device, modules = recipe.device, modules or {}
    ranks = _torchrun.join(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    ckpt = checkpoint_path(out)
    start, best, result = 0, copy.deepcopy(model.state_dict()), Result()
    if resume:
        if not ckpt.exists():
            raise UserError(f"--resume: no checkpoint at {ckpt}")
        start, best, result = _read_checkpoint(ckpt, fingerprint, model, optimizer, modules, device)
        if ranks.main:
            console.print(f"resumed from {ckpt} after epoch {start}")
    states = [model.state_dict()] + [m.state_dict() for m in modules.values()]
    ranks.broadcast_([t for state in states for t in state.values() if t.is_floating_point()])
    if not len(data.splits["train"][1]):
        raise UserError(f"{data.path}: the train split holds no images")
    train = tuple(t.to(device) for t in data.splits["train"])
    steps_per_epoch = -(-len(train[1]) // recipe.batch_size)

    progress = progress_bar(console, enabled=ranks.main)
    with progress:
        epochs_task = progress.add_task(f"{title} epochs", total=recipe.epochs, completed=start, info="")
        batch_task = progress.add_task("  batches", total=steps_per_epoch, info="")
        for epoch in range(start, recipe.epochs):
            tic = time.time()
            # StepLR, stateless so resume is exact; halved once per rollback so far
            halvings = sum(result.history.get("rolled_back", []))
            lr = recipe.lr * recipe.lr_gamma ** (epoch // recipe.lr_step) * 0.5**halvings
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = epoch_generator(recipe.seed, epoch)
            if begin_epoch is not None:
                begin_epoch(epoch, gen)
            progress.reset(batch_task, total=steps_per_epoch)
            sums = _train_epoch(
                model, train, step, optimizer, recipe, gen, ranks, ckpt, epoch, lambda: progress.advance(batch_task)
            )
            row = {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}
            row["val_accuracy"] = accuracy(model, *data.splits["val"], device)
            row["test_accuracy"] = accuracy(model, *data.splits["test"], device)
            row.update(diagnostics() if diagnostics is not None else {})
            row["lr"] = lr
            roll = rollbacks and collapsed(row["val_accuracy"], result, len(data.classes), rollbacks)
            if rollbacks:
                row["rolled_back"] = float(roll)
            row["epoch_seconds"] = time.time() - tic
            best = _select(model, optimizer, result, row, epoch, best, roll, ranks)
            if ranks.main:
                _write_checkpoint(ckpt, fingerprint, epoch + 1, model, optimizer, modules, best, result)
            info = f"val {row['val_accuracy']:.4f} test {row['test_accuracy']:.4f}"
            progress.update(epochs_task, advance=1, info=info)
            if ranks.main:
                console.log(
                    f"epoch {epoch + 1}/{recipe.epochs} "
                    + " ".join(f"{k.removeprefix('train_')} {v:.4g}" for k, v in row.items() if k.startswith("train_"))
                    + f" {info}"
                )
    model.load_state_dict(best)
    return result


def _train_epoch(model, train, step, optimizer, recipe, gen, ranks, ckpt, epoch, advance) -> dict[str, float]:
    """One pass over the train split; the sums of the step's terms. Stops the run on a non-finite term."""
    model.train()
    train_x, train_y = train
    reduces = ranks.world > 1 and getattr(step, "reduces_gradients", False)
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    sums: dict[str, float] = {}
    for i, idx in enumerate(_data.batches(len(train_x), recipe.batch_size, gen)):
        x = _data.to_float(train_x[idx.to(recipe.device)])
        if recipe.augment:  # before sharding, so every rank draws the same numbers
            x = _data.augment_crop_flip(x, gen)
        y = train_y[idx.to(recipe.device)]
        if ranks.world > 1:
            x, y = x[ranks.shard(len(x))], y[ranks.shard(len(y))]
        optimizer.zero_grad(set_to_none=True)
        terms = step(x, y, gen)
        if ranks.world > 1 and not reduces:
            _average_gradients(model, terms, ranks)
        values = {k: float(v) for k, v in terms.items()}
        if not all(np.isfinite(v) for v in values.values()):
            bad = ", ".join(f"{k}={v}" for k, v in values.items() if not np.isfinite(v))
            kept = f"last good checkpoint kept at {ckpt}" if ckpt.exists() else "no checkpoint written yet"
            raise UserError(f"training diverged at epoch {epoch + 1} step {i + 1} ({bad}); {kept}")
        optimizer.step()
        ranks.broadcast_(buffers)  # BatchNorm running statistics: rank 0's, as DDP does
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        advance()
    return sums


def _select(model, optimizer, result: Result, row: dict, epoch: int, best: dict, roll: bool, ranks: Ranks) -> dict:
    """Record the epoch's row; keep the weights of the best val epoch, or go back to them after a collapse."""
    for k, v in row.items():
        result.history.setdefault(k, []).append(v)
    result.seconds += row["epoch_seconds"]
    if roll:
        model.load_state_dict(best)
        optimizer.state.clear()  # momentum of the collapsed trajectory
        if ranks.main:
            console.log(
                f"epoch {epoch + 1}: val accuracy fell to chance ({row['val_accuracy']:.4f}), the "
                f"network collapsed: back to epoch {result.chosen_epoch}'s weights, learning rate halved"
            )
    elif epoch == 0 or row["val_accuracy"] > result.val_accuracy:
        result.chosen_epoch, result.val_accuracy, result.test_accuracy = (
            epoch + 1,
            row["val_accuracy"],
            row["test_accuracy"],
        )
        best = copy.deepcopy(model.state_dict())
    return best


def chance_level(num_classes: int) -> float:
    """Val accuracy under this is "at chance" for collapse detection: a network that answers one class scores about
    1 / classes."""
    return 1.5 / num_classes


def collapsed(val_accuracy: float, result: Result, num_classes: int, rollbacks: int) -> bool:
    """Whether this epoch's val accuracy is a collapse to roll back from: at chance after an epoch of at least twice
    that, with rollbacks left."""
    chance = chance_level(num_classes)
    used = sum(result.history.get("rolled_back", []))
    seen_good = bool(result.history.get("val_accuracy")) and result.val_accuracy >= 2 * chance
    return seen_good and val_accuracy < chance and used < rollbacks


def collapse_epoch(val_accuracy: list[float], num_classes: int) -> int:
    """The 1-based epoch from which val accuracy stayed at chance after having been at least twice that, or 0."""
    chance = chance_level(num_classes)
    best, start = 0.0, 0
    for i, acc in enumerate(val_accuracy):
        if acc >= chance:
            start = 0
        elif not start and best >= 2 * chance:
            start = i + 1
        best = max(best, acc)
    return start


def _average_gradients(model: torch.nn.Module, terms: dict[str, torch.Tensor], ranks: Ranks) -> None:
    """Mean of every rank's gradients and logged terms, in one all-reduce (what DDP's buckets do)."""
    params = [p for p in model.parameters() if p.grad is not None]
    values = [v.detach().reshape(1).to(torch.float64) for v in terms.values()]
    flat = torch.cat([p.grad.reshape(-1).to(torch.float64) for p in params] + values)
    ranks.sum_(flat).div_(ranks.world)
    parts = flat.split([p.numel() for p in params] + [1] * len(values))
    for p, part in zip(params, parts, strict=False):
        p.grad.copy_(part.view_as(p.grad))
    for key, part in zip(terms, parts[len(params) :], strict=True):
        terms[key] = part[0]


def fingerprint(params: dict) -> str:
    """Parameters that must match for a checkpoint to be resumed (everything but where and whether to resume)."""
    keep = {k: v for k, v in params.items() if k not in ("resume", "out")}
    return json.dumps(keep, sort_keys=True, default=str)


def summarise(title: str, data: _data.Dataset, result: Result, out: Path) -> None:
    """The table `train` and `train-ini` end with, and what went wrong along the way (a collapse)."""
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
        console.print(
            f"note: the network collapsed {rolled} time(s) and was rolled back to its best epoch each time, "
            f"with the learning rate halved (history column rolled_back)"
        )
    collapsed_at = collapse_epoch(result.history.get("val_accuracy", []), len(data.classes))
    if collapsed_at:
        console.print(
            f"warning: val accuracy fell to chance at epoch {collapsed_at} and stayed there (the network "
            f"collapsed); the victim is epoch {result.chosen_epoch}'s. Try a lower --lr or another seed."
        )

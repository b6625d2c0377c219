"""The training loop shared by `train` and `train-ini`: SGD + StepLR, per-epoch val/test, model selection on
val only, an atomic checkpoint after every epoch, exact `--resume`, and a stop on a non-finite loss."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stages import _data
from stages._artifacts import UserError, load_history, load_state, open_artifact, save_history, save_state, write_artifact

console = Console(stderr=True, log_path=False)

# step(x, y, epoch_generator) -> named loss terms; it leaves gradients in .grad, the loop zeroes and steps.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


@dataclass
class Recipe:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.5
    weight_decay: float = 1e-3
    lr_step: int = 20
    lr_gamma: float = 0.1
    seed: int = 0
    device: str = "cpu"
    augment: bool = False


@dataclass
class Result:
    history: dict[str, list[float]] = field(default_factory=dict)
    chosen_epoch: int = 0
    val_accuracy: float = 0.0
    test_accuracy: float = 0.0
    seconds: float = 0.0


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation draw from a generator fixed by (seed, epoch), so a resumed run replays exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str, batch: int = 1024) -> float:
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
        result = Result(load_history(f["history"]), int(f.attrs["chosen_epoch"]), float(f.attrs["val_accuracy"]),
                        float(f.attrs["test_accuracy"]), float(f.attrs["seconds"]))
        return int(f.attrs["epoch"]), best, result


def fit(
    model: torch.nn.Module,
    data: _data.Dataset,
    step: Step,
    recipe: Recipe,
    out: Path,
    fingerprint: str,
    resume: bool = False,
    modules: Optional[dict[str, torch.nn.Module]] = None,
    begin_epoch: Optional[Callable[[int, torch.Generator], None]] = None,
    diagnostics: Optional[Callable[[], dict[str, float]]] = None,
    title: str = "train",
) -> Result:
    """Train `model` in place; on return it holds the weights of the epoch with the best val accuracy."""
    device = recipe.device
    modules = modules or {}
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    ckpt = checkpoint_path(out)
    start, best, result = 0, copy.deepcopy(model.state_dict()), Result()
    if resume:
        if not ckpt.exists():
            raise UserError(f"--resume: no checkpoint at {ckpt}")
        start, best, result = _read_checkpoint(ckpt, fingerprint, model, optimizer, modules, device)
        console.print(f"resumed from {ckpt} after epoch {start}")
    train_x, train_y = (t.to(device) for t in data.splits["train"])
    val_x, val_y = data.splits["val"]
    test_x, test_y = data.splits["test"]
    steps_per_epoch = -(-len(train_x) // recipe.batch_size)

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
    with progress:
        epochs_task = progress.add_task(f"{title} epochs", total=recipe.epochs, completed=start, info="")
        batch_task = progress.add_task("  batches", total=steps_per_epoch, info="")
        for epoch in range(start, recipe.epochs):
            tic = time.time()
            lr = recipe.lr * recipe.lr_gamma ** (epoch // recipe.lr_step)  # StepLR, stateless so resume is exact
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = epoch_generator(recipe.seed, epoch)
            if begin_epoch is not None:
                begin_epoch(epoch, gen)
            model.train()
            sums: dict[str, float] = {}
            progress.reset(batch_task, total=steps_per_epoch)
            for i, idx in enumerate(_data.batches(len(train_x), recipe.batch_size, gen)):
                x = _data.to_float(train_x[idx.to(device)])
                if recipe.augment:
                    x = _data.augment_crop_flip(x, gen)
                optimizer.zero_grad(set_to_none=True)
                terms = step(x, train_y[idx.to(device)], gen)
                values = {k: float(v) for k, v in terms.items()}
                if not all(np.isfinite(v) for v in values.values()):
                    bad = ", ".join(f"{k}={v}" for k, v in values.items() if not np.isfinite(v))
                    kept = f"last good checkpoint kept at {ckpt}" if ckpt.exists() else "no checkpoint written yet"
                    raise UserError(f"training diverged at epoch {epoch + 1} step {i + 1} ({bad}); {kept}")
                optimizer.step()
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                progress.advance(batch_task)
            row = {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}
            row["val_accuracy"] = accuracy(model, val_x, val_y, device)
            row["test_accuracy"] = accuracy(model, test_x, test_y, device)
            if diagnostics is not None:
                row.update(diagnostics())
            row["lr"] = lr
            row["epoch_seconds"] = time.time() - tic
            for k, v in row.items():
                result.history.setdefault(k, []).append(v)
            result.seconds += row["epoch_seconds"]
            if epoch == 0 or row["val_accuracy"] > result.val_accuracy:
                result.chosen_epoch, result.val_accuracy, result.test_accuracy = epoch + 1, row["val_accuracy"], row["test_accuracy"]
                best = copy.deepcopy(model.state_dict())
            _write_checkpoint(ckpt, fingerprint, epoch + 1, model, optimizer, modules, best, result)
            info = f"val {row['val_accuracy']:.4f} test {row['test_accuracy']:.4f}"
            progress.update(epochs_task, advance=1, info=info)
            console.log(f"epoch {epoch + 1}/{recipe.epochs} " + " ".join(
                f"{k.removeprefix('train_')} {v:.4g}" for k, v in row.items() if k.startswith("train_")) + f" {info}")
    model.load_state_dict(best)
    return result


def fingerprint(params: dict) -> str:
    """Parameters that must match for a checkpoint to be resumed (everything but where and whether to resume)."""
    keep = {k: v for k, v in params.items() if k not in ("resume", "out")}
    return json.dumps(keep, sort_keys=True, default=str)


def recipe_params(recipe: Recipe) -> dict:
    return asdict(recipe)


# Recipe flags, declared once for every training stage (Typer reads the Annotated metadata).

Epochs = Annotated[int, typer.Option(min=1, help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Batch size.")]
LR = Annotated[float, typer.Option(min=0.0, help="SGD learning rate.")]
Momentum = Annotated[float, typer.Option(min=0.0, max=1.0, help="SGD momentum.")]
WeightDecay = Annotated[float, typer.Option(min=0.0, help="SGD weight decay.")]
LRStep = Annotated[int, typer.Option(min=1, help="StepLR: decay the learning rate every N epochs.")]
LRGamma = Annotated[float, typer.Option(min=0.0, max=1.0, help="StepLR decay factor.")]
Seed = Annotated[int, typer.Option(help="Seed of initialisation, shuffling and augmentation.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")]
Augment = Annotated[Optional[bool], typer.Option(help="Random crop + flip [default: on for RGB data].")]
Resume = Annotated[bool, typer.Option(help="Continue from the checkpoint beside --out.")]

"""steal's checkpoint, `<out stem>.ckpt.h5` (checkpoint/1): the transfer set recorded so far, the surrogate, the
thief's random generator state, the history and the attack's own state, written atomically wherever an attack
checkpoints
(after querying, after every epoch or budget slice). `steal --resume` asks none of those queries again and, on CPU,
ends with the weights of an uninterrupted run; queries made after the last checkpoint are asked again."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.params import UserError
from stages.attacks.blackbox import BlackBox
from stages.core import artifacts as _artifacts
from stages.core.artifacts import load_history, load_state, open_artifact


@dataclass
class Saved:
    epoch: int  # evaluations so far (epochs; dfme: budget slices)
    history: dict[str, list[float]]
    attack: dict[str, Any]  # what the attack handed to thief.checkpoint
    images: np.ndarray  # the transfer set, as the black box stores it
    answers: np.ndarray


def write(
    path: Path,
    fingerprint: str,
    epoch: int,
    surrogate: nn.Module,
    rng: torch.Generator,
    history: dict[str, list[float]],
    box: BlackBox,
    attack: dict[str, Any],
) -> None:
    with _artifacts.write_artifact(path, "checkpoint", "steal", {"fingerprint": fingerprint}) as f:
        f.attrs["epoch"] = epoch
        f.attrs["queries"] = box.used
        f.attrs["surrogate_training"] = surrogate.training  # BatchNorm: an attack may use it between epochs
        _artifacts.save_state(f.create_group("surrogate"), surrogate.state_dict())
        f.create_dataset("rng", data=rng.get_state().numpy())
        _artifacts.save_history(f.create_group("history"), history)
        images, answers = box.recorded()
        transfer = f.create_group("transfer")
        transfer.create_dataset("images", data=images)
        transfer.create_dataset("answers", data=answers)
        group = f.create_group("attack")
        for key, value in attack.items():
            if isinstance(value, torch.Tensor):
                group.create_dataset(key, data=value.detach().cpu().numpy())
            else:
                group.attrs[key] = value


def read(path: Path, fingerprint: str, surrogate: nn.Module, rng: torch.Generator) -> Saved:
    """Load the surrogate and the thief's random generator in place; the rest is returned."""
    try:
        return _read(path, fingerprint, surrogate, rng)
    except (KeyError, ValueError, TypeError, RuntimeError, OSError) as e:  # a damaged or hand-edited checkpoint
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"{path}: damaged checkpoint ({reason}); remove it or drop --resume") from None


def _read(path: Path, fingerprint: str, surrogate: nn.Module, rng: torch.Generator) -> Saved:
    with open_artifact(path, "checkpoint") as f:
        if json.loads(f.attrs["params"])["fingerprint"] != fingerprint:
            raise UserError(f"{path}: checkpoint was made with other parameters; remove it or drop --resume")
        device = next(surrogate.parameters()).device
        surrogate.load_state_dict({k: v.to(device) for k, v in load_state(f["surrogate"]).items()})
        surrogate.train(bool(f.attrs["surrogate_training"]))
        rng.set_state(torch.from_numpy(f["rng"][()]))
        group = f["attack"]
        attack: dict[str, Any] = {key: torch.from_numpy(np.asarray(group[key][()])) for key in group}
        attack.update({key: value.item() for key, value in group.attrs.items()})  # numpy scalars to int / float
        return Saved(
            int(f.attrs["epoch"]),
            load_history(f["history"]),
            attack,
            f["transfer/images"][()],
            f["transfer/answers"][()],
        )

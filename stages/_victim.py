"""`victim/1` artifacts, written by `train` and `train-ini` alike and read by `export`, `steal` and `evaluate`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import models
from stages import _data, _loop
from stages._artifacts import UserError, attr_json, load_history, load_state, open_artifact, save_history, save_state, write_artifact


@dataclass
class VictimInfo:
    path: Path
    arch: str
    dataset: str
    dataset_sha256: str
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    objective: str
    chosen_epoch: int
    test_accuracy: float
    history: dict[str, list[float]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def build(self) -> models.Classifier:
        c, h, _ = self.input_shape
        return models.build_model(self.arch, len(self.classes), c, h, self.mean, self.std)


def build_for(arch: str, data: _data.Dataset) -> models.Classifier:
    c, h, w = data.shape
    if h != w:
        raise UserError(f"{data.path}: only square images are supported, got {h}x{w}")
    return models.build_model(arch, data.num_classes, c, h, data.mean, data.std)


def save(path: Path, model: torch.nn.Module, arch: str, data: _data.Dataset, objective: str, result: _loop.Result,
         stage: str, params: dict, inputs: list, seed: int, started: float,
         extra: dict[str, torch.nn.Module] | None = None) -> None:
    with write_artifact(path, "victim", stage, params, inputs, seed, started) as f:
        f.attrs["arch"] = arch
        f.attrs["dataset"] = data.name
        f.attrs["dataset_sha256"] = data.sha256
        f.attrs["classes"] = json.dumps(data.classes)
        f.attrs["input_shape"] = list(data.shape)
        f.attrs["mean"] = data.mean
        f.attrs["std"] = data.std
        f.attrs["objective"] = objective
        f.attrs["chosen_epoch"] = result.chosen_epoch
        f.attrs["val_accuracy"] = result.val_accuracy
        f.attrs["test_accuracy"] = result.test_accuracy
        f.attrs["train_seconds"] = result.seconds
        save_state(f.create_group("weights"), model.state_dict())
        save_history(f.create_group("history"), result.history)
        for name, module in (extra or {}).items():
            save_state(f.create_group(name), module.state_dict())


def load(path: Path, device: str = "cpu") -> tuple[models.Classifier, VictimInfo]:
    with open_artifact(path, "victim") as f:
        try:
            info = VictimInfo(
                Path(path), str(f.attrs["arch"]), str(f.attrs["dataset"]), str(f.attrs["dataset_sha256"]),
                attr_json(f, "classes"), tuple(int(v) for v in f.attrs["input_shape"]),
                [float(v) for v in f.attrs["mean"]], [float(v) for v in f.attrs["std"]], str(f.attrs["objective"]),
                int(f.attrs["chosen_epoch"]), float(f.attrs["test_accuracy"]), load_history(f["history"]),
                {k: f.attrs[k] for k in ("stage", "params", "inputs", "seed", "versions", "created_utc", "wall_seconds") if k in f.attrs},
            )
            state = load_state(f["weights"])
        except KeyError as e:
            raise UserError(f"{path}: victim artifact lacks {e}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: weights hold NaN/Inf ({', '.join(bad[:3])}); the file is damaged or training diverged")
    model = info.build()
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{path}: weights do not fit a {info.arch} for {info.input_shape}") from None
    return model.to(device).eval(), info


def check_matches(info: VictimInfo, data: _data.Dataset) -> None:
    """A victim only makes sense with the data it was trained for."""
    if info.dataset != data.name or tuple(info.input_shape) != tuple(data.shape) or len(info.classes) != data.num_classes:
        raise UserError(f"victim {info.path} was trained on {info.dataset} {list(info.input_shape)} "
                        f"({len(info.classes)} classes), not on {data.path} ({data.name} {list(data.shape)})")

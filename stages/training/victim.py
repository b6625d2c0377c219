"""Victims: `victim/1` artifacts, written by `train` and `train-ini` alike, read by `export`, `steal` and
`evaluate`, and deployed `victim.pt` files read back through the metadata `export` puts inside. One record,
`VictimInfo`, says what either declares; one check says whether a dataset is the one a victim was trained on."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

import models
from models.params import UserError
from stages.core.artifacts import (
    artifact_kind,
    attr_json,
    load_history,
    load_state,
    open_artifact,
    save_history,
    save_state,
    sha256,
    write_artifact,
)
from stages.data import prepared as _data
from stages.training import jit as _jit
from stages.training import loop as _loop

PROVENANCE = ("stage", "params", "inputs", "seed", "versions", "created_utc", "wall_seconds")
# Flags that place files, choose how the maths runs or how much is measured, not what the victim is. on_collapse is
# a safeguard that changes nothing unless a run collapses (and then the history says rolled_back).
NOT_RECIPE = (
    "seed",
    "out",
    "resume",
    "dataset",
    "device",
    "compile_mode",
    "implementation",
    "processes",
    "on_collapse",
    "diagnostic_images",
)


@dataclass
class VictimInfo:
    """What a victim declares: read from victim.h5, or from the metadata inside a deployed victim.pt."""

    path: Path
    sha256: str
    arch: str
    dataset: str
    dataset_path: str  # where train/train-ini read the data: the default evaluation set
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    objective: str
    baked_defense: str = "none"  # the defense inside a victim.pt ("none" for victim.h5)
    chosen_epoch: int = 0
    test_accuracy: float = math.nan
    seed: int = -1  # unknown for a victim.pt
    wall_seconds: float = math.nan  # the training stage's, unknown for a victim.pt
    history: dict[str, list[float]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # the training stage's root attributes
    recipe: Optional[dict] = None  # its recipe identity (`identity`); None: trained before victims recorded it
    recipe_changes: Optional[dict] = None  # the entries of `recipe` off the training stage's defaults

    @property
    def params(self) -> dict[str, Any]:
        """The flags the training stage ran with."""
        return json.loads(self.provenance.get("params", "{}"))

    @property
    def recipe_id(self) -> str:
        """Six hex digits of the recipe's hash: victims that differ only by seed share it."""
        return hashlib.sha256(json.dumps(self.recipe, sort_keys=True).encode()).hexdigest()[:6]

    def card(self) -> dict[str, Any]:
        """What a victim declares to whoever queries it (serve's GET /v1/model): enough to send well-formed queries,
        nothing of how it was made. `from_card` reads it back, and the metadata of a deployed file too."""
        return dict(
            arch=self.arch,
            dataset=self.dataset,
            classes=self.classes,
            input_shape=list(self.input_shape),
            mean=self.mean,
            std=self.std,
        )

    def metadata(self) -> dict[str, Any]:
        """The card and how the victim was made: what `export` puts inside a deployed victim.pt or victim.onnx."""
        return dict(
            **self.card(),
            objective=self.objective,
            defense=self.baked_defense,
            recipe=self.recipe,
            recipe_changes=self.recipe_changes,
            victim_provenance=self.provenance,
        )

    @classmethod
    def from_card(cls, card: dict[str, Any], path: Path, sha256: str, what: str) -> "VictimInfo":
        """The victim a card or a deployed file's metadata declares (the keys of `card` and `metadata`);
        a card that lacks a field, or holds a malformed one, is a one-line error naming `what` was read."""
        try:
            provenance = card.get("victim_provenance") or {}
            params = json.loads(provenance.get("params", "{}"))
            return cls(
                path=Path(path),
                sha256=sha256,
                arch=str(card["arch"]),
                dataset=str(card["dataset"]),
                dataset_path=str(params.get("dataset", card["dataset"])),
                classes=[str(c) for c in card["classes"]],
                input_shape=tuple(int(v) for v in card["input_shape"]),
                mean=[float(v) for v in card["mean"]],
                std=[float(v) for v in card["std"]],
                objective=str(card.get("objective", "?")),
                baked_defense=str(card.get("defense", "none")),
                provenance=provenance,
                recipe=card.get("recipe"),
                recipe_changes=card.get("recipe_changes"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{what} lacks {e} or holds it malformed") from None

    def build(self) -> models.Classifier:
        c, h, _ = self.input_shape
        return models.build_model(self.arch, len(self.classes), c, h, self.mean, self.std)


def identity(
    objective: str, params: dict, defaults: dict, inert: Optional[dict[str, tuple[str, ...]]] = None
) -> tuple[dict, dict]:
    """A victim's recipe identity from the flags its training stage resolved: the objective and every flag that
    makes the victim what it is, seed aside. A flag the params lack takes the stage's default (`defaults`): a victim
    trained before a flag existed was trained as its default behaves. Left out: NOT_RECIPE, and the flags that only
    refine a switched-off one (`inert`: switch -> its refinements). OOD sets by name, not by where they lay.
    Returned with the entries that differ from the stage's defaults: what a reader names the victim by."""
    recipe = {k: v for k, v in {**defaults, **params}.items() if k not in NOT_RECIPE}
    for switch, refinements in (inert or {}).items():
        if not recipe.get(switch):
            for key in refinements:
                recipe.pop(key, None)
    if isinstance(recipe.get("ood"), str):
        recipe["ood"] = ",".join(Path(o).stem for o in recipe["ood"].split(","))
    recipe = {"objective": objective, **recipe}
    changes = {k: v for k, v in recipe.items() if k != "objective" and v != defaults.get(k)}
    return recipe, changes


def build_for(arch: str, data: _data.Dataset) -> models.Classifier:
    c, h, w = data.shape
    if h != w:
        raise UserError(f"{data.path}: only square images are supported, got {h}x{w}")
    return models.build_model(arch, data.num_classes, c, h, data.mean, data.std)


def save(
    path: Path,
    model: torch.nn.Module,
    *,
    arch: str,
    data: _data.Dataset,
    objective: str,
    result: _loop.Result,
    stage: str,
    params: dict,
    recipe: tuple[dict, dict],
    inputs: list,
    seed: int,
    started: float,
    extra: dict[str, torch.nn.Module] | None = None,
) -> None:
    """Write `victim/1`: the weights, what the victim declares, its recipe identity and `extra` networks."""
    with write_artifact(path, "victim", stage, params, inputs, seed, started) as f:
        f.attrs["arch"] = arch
        f.attrs["dataset"] = data.name
        f.attrs["dataset_sha256"] = data.sha256
        f.attrs["classes"] = json.dumps(data.classes)
        f.attrs["input_shape"] = list(data.shape)
        f.attrs["mean"] = data.mean
        f.attrs["std"] = data.std
        f.attrs["objective"] = objective
        f.attrs["recipe"] = json.dumps(recipe[0], sort_keys=True)
        f.attrs["recipe_changes"] = json.dumps(recipe[1], sort_keys=True)
        f.attrs["chosen_epoch"] = result.chosen_epoch
        f.attrs["val_accuracy"] = result.val_accuracy
        f.attrs["test_accuracy"] = result.test_accuracy
        f.attrs["train_seconds"] = result.seconds
        save_state(f.create_group("weights"), model.state_dict())
        save_history(f.create_group("history"), result.history)
        for name, module in (extra or {}).items():
            save_state(f.create_group(name), module.state_dict())


def _declared(f, path: Path) -> dict[str, Any]:
    """What a victim.h5 and a surrogate.h5 both declare about their network, as VictimInfo fields."""
    return dict(
        path=Path(path),
        sha256=sha256(path),
        arch=str(f.attrs["arch"]),
        dataset=str(f.attrs["dataset"]),
        classes=attr_json(f, "classes"),
        input_shape=tuple(int(v) for v in f.attrs["input_shape"]),
        mean=[float(v) for v in f.attrs["mean"]],
        std=[float(v) for v in f.attrs["std"]],
        seed=int(f.attrs.get("seed", -1)),
        wall_seconds=float(f.attrs.get("wall_seconds", math.nan)),
    )


def _network(info: VictimInfo, state: dict, device: str) -> models.Classifier:
    """The declared network with its weights, refusing non-finite weights or weights of another shape in one line."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(
            f"{info.path}: weights hold NaN/Inf ({', '.join(bad[:3])}); the file is damaged or training diverged"
        )
    model = info.build()
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{info.path}: weights do not fit a {info.arch} for {info.input_shape}") from None
    return model.to(device).eval()


def load(path: Path, device: str = "cpu") -> tuple[models.Classifier, VictimInfo]:
    """The victim network of a victim.h5 (eval mode) and what it declares."""
    with open_artifact(path, "victim") as f:
        try:
            provenance = {k: f.attrs[k] for k in PROVENANCE if k in f.attrs}
            params = json.loads(provenance.get("params", "{}"))
            recorded = "recipe" in f.attrs
            info = VictimInfo(
                **_declared(f, path),
                dataset_path=str(params.get("dataset", f.attrs["dataset"])),
                objective=str(f.attrs["objective"]),
                chosen_epoch=int(f.attrs["chosen_epoch"]),
                test_accuracy=float(f.attrs["test_accuracy"]),
                history=load_history(f["history"]),
                provenance=provenance,
                recipe=attr_json(f, "recipe") if recorded else None,
                recipe_changes=attr_json(f, "recipe_changes") if recorded else None,
            )
            state = load_state(f["weights"])
        except KeyError as e:
            raise UserError(f"{path}: victim artifact lacks {e}") from None
    return _network(info, state, device), info


def load_surrogate(path: Path, device: str = "cpu") -> tuple[models.Classifier, VictimInfo]:
    """A stolen surrogate.h5 as a model in its own right: a thief's copy, to deploy (`export`) or to distil once
    more. Its evaluation set is the one steal measured it on (`--data`, else its victim's)."""
    with open_artifact(path, "surrogate") as f:
        try:
            params = attr_json(f, "params")
            provenance = {k: f.attrs[k] for k in PROVENANCE if k in f.attrs}
            data = params.get("data")
            if data is None and params.get("victim") and Path(params["victim"]).exists():
                data = load(Path(params["victim"]))[1].dataset_path
            data = data or str(f.attrs["dataset"])
            provenance["params"] = json.dumps({**params, "dataset": data})
            info = VictimInfo(
                **_declared(f, path),
                dataset_path=data,
                objective=f"stolen ({f.attrs['attack']}, {f.attrs['label']} labels)",
                test_accuracy=float(f.attrs["stealing_accuracy"]),
                provenance=provenance,
            )
            state = load_state(f["weights"])
        except KeyError as e:
            raise UserError(f"{path}: surrogate artifact lacks {e}") from None
    return _network(info, state, device), info


def load_model(path: Path, device: str = "cpu") -> tuple[models.Classifier, VictimInfo]:
    """A victim.h5 or a stolen surrogate.h5, by its schema."""
    return load_surrogate(path, device) if artifact_kind(path) == "surrogate" else load(path, device)


def load_deployed(path: Path, device: str = "cpu") -> tuple[torch.jit.ScriptModule, VictimInfo]:
    """A deployed victim.pt (a program: only from a path the user named) and what its metadata declares."""
    module, meta = _jit.load(path, device)
    return module, VictimInfo.from_card(meta, path, sha256(path), f"{path}: metadata")


def check_matches(info: VictimInfo, data: _data.Dataset) -> None:
    """A victim only makes sense with the data it was trained for: the one check of it."""
    if (
        info.dataset != data.name
        or tuple(info.input_shape) != tuple(data.shape)
        or len(info.classes) != data.num_classes
    ):
        raise UserError(
            f"victim {info.path} was trained on {info.dataset} {list(info.input_shape)} "
            f"({len(info.classes)} classes), not on {data.path} ({data.name} {list(data.shape)})"
        )

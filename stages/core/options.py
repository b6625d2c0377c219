"""The CLI options two or more stages share, each declared once (Typer reads the `Annotated` metadata), and the
help panels `--help` groups every stage's options into."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Callable, Optional

import typer

import models
from models.defenses import DEFENSES
from models.params import describe

# --help panels, in the order a reader meets them
DATA = "Data and OOD"
RECIPE = "Recipe"
INI_TERMS = "InI terms"
BEYOND = "Beyond the paper"
VICTIM = "Victim and defense"
ATTACK = "Attack"
RUNTIME = "Runtime"

Dataset = Annotated[str, typer.Option(help="Prepared dataset (.h5) or dataset name.", rich_help_panel=DATA)]
Arch = Annotated[str, typer.Option(help=f"Architecture: {', '.join(models.MODELS)}.", rich_help_panel=RECIPE)]

# The victim recipe of the paper's official code (SGD + StepLR): the default of `train` and `train-ini` alike, so
# that the baseline and the defense compare like with like.
PAPER_SGD = SimpleNamespace(batch_size=128, lr=0.1, momentum=0.5, weight_decay=1e-3, lr_step=20, lr_gamma=0.1)

# the training recipe of `train`, `train-ini` and (some of it) `steal`
Epochs = Annotated[int, typer.Option(min=1, help="Training epochs.", rich_help_panel=RECIPE)]
BatchSize = Annotated[int, typer.Option(min=1, help="Batch size.", rich_help_panel=RECIPE)]
LR = Annotated[float, typer.Option(min=0.0, help="SGD learning rate.", rich_help_panel=RECIPE)]
Momentum = Annotated[float, typer.Option(min=0.0, max=1.0, help="SGD momentum.", rich_help_panel=RECIPE)]
WeightDecay = Annotated[float, typer.Option(min=0.0, help="SGD weight decay.", rich_help_panel=RECIPE)]
LRStep = Annotated[
    int, typer.Option(min=1, help="StepLR: decay the learning rate every N epochs.", rich_help_panel=RECIPE)
]
LRGamma = Annotated[float, typer.Option(min=0.0, max=1.0, help="StepLR decay factor.", rich_help_panel=RECIPE)]
Augment = Annotated[
    Optional[bool], typer.Option(help="Random crop + flip [default: on for RGB data].", rich_help_panel=RECIPE)
]
Seed = Annotated[int, typer.Option(help="Seed of initialisation, shuffling and augmentation.", rich_help_panel=RECIPE)]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda[:N].", rich_help_panel=RUNTIME)]
Resume = Annotated[bool, typer.Option(help="Continue from the checkpoint beside --out.", rich_help_panel=RUNTIME)]

# the posterior defense of `steal` and `export`
DefenseName = Annotated[str, typer.Option(help=f"Posterior defense: {', '.join(DEFENSES)}.", rich_help_panel=VICTIM)]
DefenseParams = Annotated[
    Optional[list[str]],
    typer.Option(
        "--defense-param",
        metavar="KEY=VALUE",
        rich_help_panel=VICTIM,
        help=f"Defense parameter, repeatable. Defaults: {describe(DEFENSES)}.",
    ),
]


def defaults(run: Callable[..., Any]) -> dict[str, Any]:
    """Every flag of a stage's `run` at its default: declared once, in the signature."""
    return {name: p.default for name, p in inspect.signature(run).parameters.items()}


def flags_of(run: Callable[..., Any], *derived: str, secrets: tuple[str, ...] = ()) -> type:
    """The frozen dataclass a stage's resolved flags travel in: one field per flag of its `run`, declared once (in
    the signature), but its `secrets` (used, never recorded), plus the `derived` facts the run records beside them;
    read as attributes, changed only by `dataclasses.replace`, recorded with `dataclasses.asdict`."""
    flags = [name for name in inspect.signature(run).parameters if name not in secrets]
    fields = [(name, Any) for name in flags] + [(name, Any, None) for name in derived]
    stage = run.__module__.rpartition(".")[2].title().replace("_", "")
    return dataclasses.make_dataclass(f"{stage}Flags", fields, frozen=True)


# the watermark's secret (`steal --defense watermark`, `serve`, `verify`)
WatermarkKey = Annotated[
    Optional[Path],
    typer.Option(
        help="The watermark's secret key file (random bytes, created 0600 when absent) [default: "
        "artifacts/watermark.key]; never recorded, artifacts keep its fingerprint.",
        rich_help_panel=VICTIM,
    ),
]

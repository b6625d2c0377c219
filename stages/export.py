"""Export a victim for deployment: `victim.h5` -> `victim.pt`, one TorchScript graph (or `--format onnx`:
`victim.onnx`), images in [0, 1] -> normalise -> network -> softmax -> defense, with its metadata inside.

The file is loaded back (ONNX: by ONNX Runtime) and checked against the eager model on a real batch before it
replaces the output.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from models.defenses import DEFENSES, Deployed
from models.params import UserError
from stages.core import options as _options
from stages.core.artifacts import describe_inputs, prepare_output, versions
from stages.data import prepared as _data
from stages.deploy import defense as _defense
from stages.deploy import onnx_export as _onnx
from stages.training import jit as _jit
from stages.training import victim as _victim

console = Console(stderr=True)
TOLERANCE = 1e-5


def run(
    victim: Annotated[
        Path,
        typer.Option(
            help="Victim HDF5 written by train or train-ini, or a surrogate HDF5 written by steal (a stolen copy, "
            "deployed or distilled once more)."
        ),
    ] = Path("artifacts/victim.h5"),
    out: Annotated[
        Optional[Path],
        typer.Option(help="Output file [default: the victim path with .pt, or .onnx for --format onnx]."),
    ] = None,
    format: Annotated[
        Literal["torchscript", "onnx"],
        typer.Option(help="torchscript (victim.pt) or onnx (victim.onnx, checked with ONNX Runtime)."),
    ] = "torchscript",
    data: Annotated[
        Optional[str], typer.Option(help="Prepared dataset for the check batch [default: the victim's].")
    ] = None,
    defense: _options.DefenseName = "none",
    defense_param: _options.DefenseParams = None,
    check_images: Annotated[int, typer.Option(min=1, help="Test images compared scripted vs eager.")] = 256,
) -> Path:
    """Script the victim (plus a defense baked into the graph) to TorchScript or ONNX; verify it against the eager
    model."""
    started = time.time()
    defense_params = _defense.parse(defense, defense_param)
    if not getattr(DEFENSES[defense], "SCRIPTABLE", True):
        raise UserError(
            f"--defense {defense} cannot be exported: its secret key would ship inside the model; export the plain "
            "victim and let `serve --watermark-key FILE` mark its answers"
        )
    if format == "onnx" and defense in _onnx.UNSUPPORTED:
        raise UserError(
            f"--defense {defense} cannot be exported to ONNX: {_onnx.UNSUPPORTED[defense]}; use --format torchscript"
        )
    out = prepare_output(out or Path(victim).with_suffix(".onnx" if format == "onnx" else ".pt"))
    model, info = _victim.load_model(victim)
    dataset = _data.load(data or info.dataset_path, splits=("test",))
    _victim.check_matches(info, dataset)

    posterior = _defense.build(
        defense, defense_params, info.arch, len(info.classes), info.input_shape, info.mean, info.std, victim_h5=victim
    )
    deployed = Deployed(model, posterior).eval()
    metadata = {
        "schema": "deployed/1",
        "stage": "export",
        **info.metadata(),
        # the deployed graph's defense, baked in here (the victim.h5 export reads is always undefended)
        "defense": defense,
        "defense_params": defense_params,
        "output": "probabilities",
        "input_range": [0.0, 1.0],
        "format": format,
        "inputs": describe_inputs([victim]),
        "versions": versions(),
    }
    x = _data.to_float(dataset.splits["test"][0][:check_images])
    with torch.no_grad():
        eager = deployed(x)
    checked = {}

    def compare(answers: torch.Tensor) -> None:  # on the written file, before it replaces --out
        checked["scripted"], checked["delta"] = answers, float((eager - answers).abs().max())
        if not checked["delta"] <= TOLERANCE:
            raise UserError(
                f"exported graph differs from the eager model by {checked['delta']:.2e} > {TOLERANCE:g}"
                f"{' (' + defense + ' in ONNX)' if format == 'onnx' else ''}; nothing written"
            )

    def check(loaded: torch.jit.ScriptModule) -> None:
        with torch.no_grad():
            compare(loaded(x))

    if format == "onnx":
        _onnx.save(
            deployed, out, x[:2], metadata, lambda path: compare(torch.from_numpy(_onnx.Session(path)(x.numpy())))
        )
    else:
        _jit.save(deployed, out, metadata, check)
    delta, scripted = checked["delta"], checked["scripted"]
    accuracy = float((scripted.argmax(1) == dataset.splits["test"][1][:check_images]).float().mean())

    table = Table(title=f"export {info.arch} ({info.objective}) on {info.dataset}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("defense", _defense.label(defense, defense_params))
    table.add_row(
        f"max |{'onnxruntime' if format == 'onnx' else 'scripted'} - eager|", f"{delta:.2e} on {len(x)} test images"
    )
    table.add_row("accuracy on that batch", f"{accuracy:.2%}")
    table.add_row("file", f"{out} ({out.stat().st_size / 1e6:.2f} MB)")
    table.add_row("time", f"{time.time() - started:.1f} s")
    console.print(table)
    return out

"""The served graph, as a function float32 images (N, C, H, W) in [0, 1] -> float32 probabilities (N, K).

A victim.pt (TorchScript, as exported) or a victim.h5 (behind `--defense`) runs in torch; a victim.onnx in ONNX
Runtime. Both load once, in the serving process; only load files you trust.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.params import UserError
from stages.attacks import blackbox as _blackbox
from stages.core.artifacts import sha256
from stages.deploy import onnx_export as _onnx
from stages.training.victim import VictimInfo


@dataclass
class Served:
    predict: Callable[[np.ndarray], np.ndarray]
    info: VictimInfo  # what the served file declares; its defense as deployed: baked in or added by --defense
    runtime: str  # torch or onnxruntime

    def card(self) -> dict:
        """What GET /v1/model tells a client: enough to send well-formed queries and train a surrogate."""
        return dict(
            **self.info.card(),
            answers="probabilities",
            sha256=self.info.sha256,
            input_dtypes=["uint8", "float32"],
            input_range=[0.0, 1.0],
        )


def load(path: Path, defense: str, defense_params: dict, threads: int) -> Served:
    path = Path(path)
    if path.suffix == ".onnx":
        if defense != "none":
            raise UserError("--defense applies to a victim.h5; an ONNX model carries its defense baked in by export")
        session = _onnx.load(path, threads)
        return Served(
            session, VictimInfo.from_card(session.metadata, path, sha256(path), f"{path}: metadata"), "onnxruntime"
        )
    if path.suffix not in (".pt", ".h5", ".hdf5"):
        raise UserError(f"{path}: serve takes a victim.pt (TorchScript), victim.onnx or victim.h5")
    torch.set_num_threads(threads)
    graph, info = _blackbox.open_victim(path, "cpu")
    graph = _blackbox.defend(graph, info, defense, defense_params, "cpu")

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return graph(torch.from_numpy(images)).float().numpy()

    if info.baked_defense == "none":
        info = dataclasses.replace(info, baked_defense=defense)
    return Served(predict, info, "torch")

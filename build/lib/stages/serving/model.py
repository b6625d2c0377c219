"""The served graph, as a function float32 images (N, C, H, W) in [0, 1] -> float32 probabilities (N, K).

A victim.pt (TorchScript, as exported) or a victim.h5 (behind `--defense`) runs in torch; a victim.onnx in ONNX
Runtime. Both load once, in the serving process; only load files you trust.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.params import UserError
from stages.attacks import blackbox as _blackbox
from stages.core.artifacts import sha256
from stages.deploy import onnx_export as _onnx


@dataclass
class Served:
    predict: Callable[[np.ndarray], np.ndarray]
    path: Path
    sha256: str
    runtime: str  # torch or onnxruntime
    arch: str
    dataset: str
    dataset_path: str  # the victim's prepared data: the default benign traffic to calibrate on
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    defense: str  # as deployed: baked in or added by --defense

    def card(self) -> dict:
        """What GET /v1/model tells a client: enough to send well-formed queries and train a surrogate."""
        return dict(
            arch=self.arch,
            dataset=self.dataset,
            classes=self.classes,
            input_shape=list(self.input_shape),
            mean=self.mean,
            std=self.std,
            answers="probabilities",
            sha256=self.sha256,
            input_dtypes=["uint8", "float32"],
            input_range=[0.0, 1.0],
        )


def load(path: Path, defense: str, defense_params: dict, threads: int) -> Served:
    path = Path(path)
    if path.suffix == ".onnx":
        if defense != "none":
            raise UserError("--defense applies to a victim.h5; an ONNX model carries its defense baked in by export")
        session = _onnx.load(path, threads)
        m = session.metadata
        try:
            provenance = m.get("victim_provenance") or {}
            dataset_path = str(json.loads(provenance.get("params", "{}")).get("dataset", m["dataset"]))
            return Served(
                session,
                path,
                sha256(path),
                "onnxruntime",
                m["arch"],
                m["dataset"],
                dataset_path,
                list(m["classes"]),
                tuple(m["input_shape"]),
                list(m["mean"]),
                list(m["std"]),
                str(m.get("defense", "none")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: metadata lacks {e}") from None
    if path.suffix not in (".pt", ".h5", ".hdf5"):
        raise UserError(f"{path}: serve takes a victim.pt (TorchScript), victim.onnx or victim.h5")
    torch.set_num_threads(threads)
    graph, info = _blackbox.open_victim(path, "cpu")
    graph = _blackbox.defend(graph, info, defense, defense_params, "cpu")

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return graph(torch.from_numpy(images)).float().numpy()

    shown = info.baked_defense if info.baked_defense != "none" else defense
    return Served(
        predict,
        path,
        info.sha256,
        "torch",
        info.arch,
        info.dataset,
        info.dataset_path,
        info.classes,
        tuple(info.input_shape),
        info.mean,
        info.std,
        shown,
    )

"""Every ONNX call of the project, in one place: export a deployed graph with its metadata, load it for serving.

The graph is the one `export` scripts to TorchScript (images in [0, 1] -> normalise -> network -> softmax ->
defense), exported by torch.onnx's dynamo exporter with a dynamic batch dimension; the metadata JSON travels in
the model's `metadata_props`. An ONNX file holds no code, but load only files you trust all the same.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from models.params import UserError
from stages.core.artifacts import atomic_path

METADATA = "metadata.json"
INPUT = "images"
# Defenses whose graph ONNX cannot reproduce: the noise defense hashes each image through float64 sin(), and a
# hash amplifies the last-bit differences between runtimes' sin into a different noise vector (measured: answers
# differ by up to 0.04 from TorchScript's on a batch of 16).
UNSUPPORTED = {"noise": "its per-image hash of float64 sin() is not reproduced bit for bit by ONNX Runtime"}


def save(
    module: torch.nn.Module,
    path: Path,
    example: torch.Tensor,
    metadata: dict[str, Any],
    check: Callable[[Path], None] | None = None,
) -> None:
    """Export atomically; `check` gets the written file and may raise before it replaces `path`."""
    with atomic_path(path) as partial:
        # the exporter reports its passes as warnings and as lines on stdout, which carries only a stage's output
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    module.eval(),
                    (example,),
                    dynamo=True,
                    verbose=False,
                    input_names=[INPUT],
                    output_names=["probabilities"],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                )
            except Exception as e:  # the exporter raises many types for an operator it cannot express
                raise UserError(
                    f"torch.onnx cannot export this graph ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:200]}); nothing written"
                ) from None
        model = program.model_proto
        del model.metadata_props[:]
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA, json.dumps(metadata, default=str)
        import onnx

        onnx.save_model(model, str(partial))
        if check is not None:
            check(partial)


class Session:
    """An ONNX Runtime session as a function float32 images (N, C, H, W) -> probabilities (N, K)."""

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own Fail/InvalidGraph types for foreign files
            raise UserError(f"{path}: not an ONNX model ONNX Runtime can run") from None
        self._input = self._session.get_inputs()[0].name
        meta = self._session.get_modelmeta().custom_metadata_map.get(METADATA)
        if not meta:
            raise UserError(f"{path}: ONNX model without ini-toolkit metadata")
        self.metadata: dict[str, Any] = json.loads(meta)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(images, dtype=np.float32)})[0]


def load(path: Path, threads: int = 1) -> Session:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.name.endswith(".partial"):
        raise UserError(f"{path}: unfinished write of an interrupted run; rerun `export`")
    return Session(path, threads)

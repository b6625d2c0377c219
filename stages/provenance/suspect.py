"""A model under suspicion, as the verifier queries it: float images in [0, 1] -> probabilities. A surrogate.h5 or
victim.h5 (weights), a TorchScript .pt or ONNX file (only files you trust: they are programs), or a prediction API
reached over HTTP (`serve`, with an API key)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import models
from models.params import UserError
from stages.core.artifacts import artifact_kind, attr_json, load_state, open_artifact, sha256
from stages.deploy import onnx_export as _onnx
from stages.serving import client as _client
from stages.training import victim as _victim

CHUNK = 512  # images per forward pass (and per HTTP request, within the server's limit)


@dataclass
class Suspect:
    predict: Callable[[np.ndarray], np.ndarray]  # float32 (N, C, H, W) -> probabilities (N, K)
    kind: str
    name: str  # the path or URL
    sha256: str  # of the file, or the served model's as its card declares it
    input_shape: tuple[int, ...]
    num_classes: int


def open_suspect(spec: str, api_key: Optional[str]) -> Suspect:
    if spec.startswith(("http://", "https://")):
        return _served(spec, api_key)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--suspect {spec}: no such file")
    if path.suffix in (".h5", ".hdf5"):
        return _weights(path)
    if path.suffix == ".pt":
        graph, info = _victim.load_deployed(path, "cpu")
        return Suspect(_torch(graph), "torchscript", str(path), info.sha256, tuple(info.input_shape), len(info.classes))
    if path.suffix == ".onnx":
        session = _onnx.load(path)
        meta = session.metadata
        try:
            shape, classes = tuple(int(v) for v in meta["input_shape"]), len(meta["classes"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: ONNX metadata lacks {e}") from None
        return Suspect(session, "onnx", str(path), sha256(path), shape, classes)
    raise UserError(f"--suspect {spec}: give a surrogate/victim .h5, a TorchScript .pt, an .onnx file or a URL")


def _torch(net: torch.nn.Module, softmax: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        out = net(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        return (torch.softmax(out, 1) if softmax else out).float().numpy()

    return predict


def _weights(path: Path) -> Suspect:
    kind = artifact_kind(path)
    if kind == "victim":
        net, info = _victim.load(path)
        return Suspect(_torch(net, True), "victim", str(path), info.sha256, tuple(info.input_shape), len(info.classes))
    if kind != "surrogate":
        raise UserError(f"--suspect {path}: holds a {kind or 'non-ini-toolkit'!r} file, not a surrogate or victim")
    with open_artifact(path, "surrogate") as f:
        try:
            arch, classes = str(f.attrs["arch"]), attr_json(f, "classes")
            shape = tuple(int(v) for v in f.attrs["input_shape"])
            mean, std = [float(v) for v in f.attrs["mean"]], [float(v) for v in f.attrs["std"]]
            state = load_state(f["weights"])
        except KeyError as e:
            raise UserError(f"{path}: surrogate artifact lacks {e}") from None
    net = models.build_model(arch, len(classes), shape[0], shape[1], mean, std)
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{path}: weights do not fit a {arch} for {list(shape)}") from None
    return Suspect(_torch(net.eval(), True), "surrogate", str(path), sha256(path), shape, len(classes))


def _served(url: str, api_key: Optional[str]) -> Suspect:
    if not api_key:
        raise UserError("--suspect URL needs --api-key (or $INI_API_KEY)")
    endpoint = _client.Endpoint(url, api_key, 1)
    card = endpoint.get("/v1/model")  # an unreachable URL is one line here
    try:
        endpoint.max_images = int(card["max_images"])
        shape, classes, sha = tuple(int(v) for v in card["input_shape"]), len(card["classes"]), str(card["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{url}/v1/model: not an ini-toolkit model card (lacks {e})") from None

    def predict(images: np.ndarray) -> np.ndarray:
        try:
            return endpoint(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()
        except _client.BudgetExhausted as e:
            raise UserError(f"{url}: the key's budget ran out while verifying ({e})") from None

    return Suspect(predict, "served", url.rstrip("/"), sha, shape, classes)


def query(suspect: Suspect, images: np.ndarray) -> np.ndarray:
    """The suspect's probabilities for float images, in chunks; checked to be (N, K) and finite."""
    parts = [np.asarray(suspect.predict(images[i : i + CHUNK])) for i in range(0, len(images), CHUNK)]
    out = np.concatenate(parts) if parts else np.zeros((0, suspect.num_classes), np.float32)
    if out.shape != (len(images), suspect.num_classes) or not np.isfinite(out).all():
        raise UserError(f"{suspect.name}: answered {out.shape} (or non-finite values) for {len(images)} images")
    return out

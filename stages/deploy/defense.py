"""Build a posterior defense from `--defense NAME --defense-param KEY=VALUE ...`, shared by `export`, `steal` and
`evaluate`, and the one label that names a defense with its parameters.

Parameters are validated against the defense's `PARAMS` (unknown keys, non-numbers and out-of-range values are
user errors) and all go to its constructor; victim-side inputs (`NEEDS`: a random-init proxy of the victim's
architecture, seeded by the defense's own `seed` parameter; the misinformation network stored in victim.h5; the
class count; the input shape; the victim's confidence on its val split; the watermark's key file) are supplied
here, never by the user.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

import models
from models import params as registry_params
from models.defenses import DEFENSES
from models.params import UserError
from stages.core.artifacts import load_state, open_artifact
from stages.data import prepared as _data
from stages.deploy import watermark_key as _keys
from stages.training import victim as _victim

MISINFORMATION_GROUP = "misinformation"


def parse(name: str, pairs: Optional[Sequence[str]]) -> dict[str, float | int]:
    """Every parameter of the defense, with the user's values checked and the rest at their defaults."""
    if name not in DEFENSES:
        raise UserError(f"unknown defense {name!r}; choose from {', '.join(DEFENSES)}")
    return registry_params.parse(f"defense {name!r}", "--defense-param", DEFENSES[name].PARAMS, pairs)


def label(name: str, params: Optional[dict] = None) -> str:
    """`name key=value,...` (keys sorted): how reports, tables and metrics name a defense with its parameters."""
    if not params:
        return name
    return name + " " + ",".join(f"{k}={v:g}" for k, v in sorted(params.items()))


def setting(name: str, params: Optional[dict] = None) -> str:
    """`label` without what differs between the seeds of one setting: a randomised defense's own seed (steal's
    `--seed`), and the gate's threshold where a quantile calibrates it on each victim's val split. Metrics group
    seeds by it."""
    params = {k: v for k, v in (params or {}).items() if k != "seed"}
    if params.get("quantile", 0) > 0:
        params.pop("threshold", None)
    return label(name, params)


def random_proxy(arch: str, num_classes: int, input_shape: Sequence[int], mean, std, seed: int) -> models.Classifier:
    """A randomly initialised network of the victim's architecture, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build_model(arch, num_classes, input_shape[0], input_shape[1], mean, std).eval()


def load_misinformation(
    victim_h5: Optional[Path], arch: str, num_classes: int, input_shape, mean, std
) -> models.Classifier:
    if victim_h5 is None or Path(victim_h5).suffix not in (".h5", ".hdf5"):
        raise UserError(
            "adaptive-misinformation needs the misinformation network stored in victim.h5: "
            "give the .h5 victim (a victim.pt can only carry it baked in by `export`)"
        )
    with open_artifact(victim_h5, "victim") as f:
        if MISINFORMATION_GROUP not in f:
            raise UserError(
                f"{victim_h5}: no misinformation network; train the victim with "
                "`train --objective outlier-exposure --ood DATASET`"
            )
        state = load_state(f[MISINFORMATION_GROUP])
    net = models.build_model(arch, num_classes, input_shape[0], input_shape[1], mean, std)
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise UserError(
            f"{victim_h5}: the misinformation weights do not fit a {arch} for {list(input_shape)}"
        ) from None
    return net.eval()


def benign_threshold(victim_h5: Optional[Path], quantile: float) -> float:
    """The `quantile` of the victim's top probabilities on the val split of the data it was trained on."""
    if victim_h5 is None or Path(victim_h5).suffix not in (".h5", ".hdf5"):
        raise UserError(
            "quantile=Q calibrates on the victim's val split: give the victim.h5, or set quantile=0 threshold=T"
        )
    model, info = _victim.load(victim_h5)
    data = _data.load(
        str(json.loads(info.provenance.get("params", "{}")).get("dataset", info.dataset)), splits=("val",)
    )
    _victim.check_matches(info, data)
    images = data.splits["val"][0]
    if not len(images):
        raise UserError(f"{data.path}: empty val split; the gate's quantile needs benign images (or set threshold=T)")
    with torch.no_grad():
        top = torch.cat(
            [
                torch.softmax(model(_data.to_float(images[i : i + 1024])), 1).max(1).values
                for i in range(0, len(images), 1024)
            ]
        )
    return float(torch.quantile(top.double(), quantile))


def build(
    name: str,
    params: dict,
    arch: str,
    num_classes: int,
    input_shape: Sequence[int],
    mean,
    std,
    victim_h5: Optional[Path] = None,
    key_file: Optional[Path] = None,
) -> nn.Module:
    """DEFENSES[name] built from `params` (from `parse`) and the victim-side inputs it needs. A threshold the gate
        calibrates is written back into `params`, so the outputs that record them record it. `key_file`: the watermark's
    secret (created when absent; default artifacts/watermark.key), never written into `params`."""
    cls = DEFENSES[name]
    inputs = {}
    for need in cls.NEEDS:
        if need == "proxy":  # the defenses that need a proxy declare the `seed` it is drawn with
            inputs["proxy"] = random_proxy(arch, num_classes, input_shape, mean, std, int(params["seed"]))
        elif need == "misinformation":
            inputs["misinformation"] = load_misinformation(victim_h5, arch, num_classes, input_shape, mean, std)
        elif need == "num_classes":
            inputs["num_classes"] = num_classes
        elif need == "input_shape":
            inputs["input_shape"] = tuple(input_shape)
        elif need == "benign_confidence":
            quantile = params.pop("quantile")
            if quantile > 0:
                params["threshold"] = benign_threshold(victim_h5, quantile)
            params["quantile"] = quantile
        elif need == "watermark_key":
            inputs["key"] = _keys.load_or_create(key_file or _keys.DEFAULT_KEY)
        else:
            raise AssertionError(f"defense {name} needs unknown input {need!r}")
    return cls(**params, **inputs).eval()

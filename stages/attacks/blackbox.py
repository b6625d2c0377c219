"""The victim as a thief meets it: a budgeted `query(images) -> probabilities | labels` that records every answer.

`open_victim` loads `victim.pt` (a deployed TorchScript graph, only from the path the user names) or `victim.h5`;
`BlackBox` wraps the (defended) graph: one image is one query, a request beyond the budget is cut to what is
left, and every answered query is written straight into a preallocated transfer set in the output file; behind
the watermark, with the owner's record of which answers were marked and the class each mark points to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np
import torch
from torch import nn

from models.defenses import Defended, Deployed, NoDefense, Watermark
from models.params import UserError
from stages.deploy import defense as _defense
from stages.training import victim as _victim
from stages.training.victim import VictimInfo

EVAL_CHUNK = 1024  # images per victim forward pass, whatever the attack asks at once


class BudgetExhausted(Exception):
    """Raised when an attack queries again after its budget is spent: the attack is over."""


def open_victim(path: Path, device: str) -> tuple[nn.Module, VictimInfo]:
    """The victim as a graph images -> probabilities (undefended for .h5, as deployed for .pt) and what it declares."""
    path = Path(path)
    if path.suffix == ".pt":
        return _victim.load_deployed(path, device)
    classifier, info = _victim.load(path, device)
    return Deployed(classifier, NoDefense()).eval(), info


def defend(
    graph: nn.Module, info: VictimInfo, name: str, params: dict, device: str, key_file: Optional[Path] = None
) -> nn.Module:
    """The graph the thief queries: the victim behind `--defense` (`key_file`: the watermark's secret)."""
    if name != "none" and info.baked_defense != "none":
        raise UserError(
            f"{info.path} already has the defense {info.baked_defense!r} baked in; "
            "use --defense none, or give the victim.h5 to choose another"
        )
    defense = _defense.build(
        name,
        params,
        info.arch,
        len(info.classes),
        info.input_shape,
        info.mean,
        info.std,
        victim_h5=info.path if info.path.suffix in (".h5", ".hdf5") else None,
        key_file=key_file,
    ).to(device)
    if isinstance(graph, Deployed):
        return Deployed(graph.classifier, defense).eval()
    return Defended(graph, defense).eval()


@torch.no_grad()
def predict(graph: nn.Module, images: torch.Tensor, device: str) -> torch.Tensor:
    """Probabilities for float images in [0, 1], in chunks (not counted: for evaluation and the black box itself)."""
    out = [graph(images[i : i + EVAL_CHUNK].to(device)).float() for i in range(0, len(images), EVAL_CHUNK)]
    return torch.cat(out) if out else torch.empty(0)


class BlackBox:
    """`query(images)`: answers for at most `remaining` images; recorded in `transfer` (an HDF5 group) if given.

    Queries are float images in [0, 1] shaped like the victim's input. With `exact_uint8` the queries must lie on
    the 1/255 grid (pool images) and are recorded as uint8; otherwise they are recorded as float32.
    """

    def __init__(
        self,
        graph: nn.Module,
        budget: int,
        label: str,
        input_shape: tuple[int, int, int],
        num_classes: int,
        device: str,
        transfer: Optional[h5py.Group] = None,
        exact_uint8: bool = False,
        on_answer: Optional[Callable[[int], None]] = None,
    ):
        if budget < 1:
            raise UserError(f"--budget must be at least 1, got {budget}")
        if label not in ("soft", "hard"):
            raise UserError(f"--label must be soft or hard, got {label!r}")
        self._graph = graph
        self._device = device
        self._exact_uint8 = exact_uint8
        self._on_answer = on_answer
        self.budget = budget
        self.label = label
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.used = 0
        self._images = self._answers = self._watermark = None
        if transfer is not None:
            chunk = min(budget, 256)
            self._images = transfer.create_dataset(
                "images",
                shape=(budget, *self.input_shape),
                maxshape=(budget, *self.input_shape),
                dtype=np.uint8 if exact_uint8 else np.float32,
                chunks=(chunk, *self.input_shape),
                compression="lzf",
            )
            shape = (budget, num_classes) if label == "soft" else (budget,)
            self._answers = transfer.create_dataset(
                "answers",
                shape=shape,
                maxshape=shape,
                dtype=np.float32 if label == "soft" else np.int64,
                chunks=(chunk, *shape[1:]),
            )
            self._images.attrs["scale"] = 255.0 if exact_uint8 else 1.0  # stored value / scale = the image queried
            transfer.attrs["label"] = label
            self._watermark = getattr(graph, "defense", None)
            if not isinstance(self._watermark, Watermark):
                self._watermark = None
            else:
                self._marks = _watermark_record(transfer, self._watermark, budget, chunk)

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.remaining <= 0:
            raise BudgetExhausted(f"budget of {self.budget} queries spent")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"queries must be (N, {', '.join(map(str, self.input_shape))}), got {tuple(images.shape)}")
        images = images[: self.remaining].detach()  # the victim never sees a query beyond the budget
        n = len(images)
        if n == 0:
            return self._empty(images.device)
        if float(images.min()) < 0.0 or float(images.max()) > 1.0:
            raise ValueError("queries must be images in [0, 1]")
        if self._watermark is not None:
            self._watermark.log = []
        try:
            probs = predict(self._graph, images, self._device).to(images.device)
        finally:
            log = self._watermark.log if self._watermark is not None else None
            if self._watermark is not None:
                self._watermark.log = None
        answers = probs if self.label == "soft" else probs.argmax(1)
        if self._images is not None:
            stored = images.cpu().numpy()
            if self._exact_uint8:
                grid = np.rint(stored * 255.0)
                if np.abs(grid - stored * 255.0).max() > 1e-3:
                    raise ValueError("this attack's queries must be 8-bit images (pool images)")
                stored = grid.astype(np.uint8)
            self._images[self.used : self.used + n] = stored
            self._answers[self.used : self.used + n] = answers.cpu().numpy()
            if log is not None:
                self._write_marks(self.used, log)
        self.used += n
        if self._on_answer is not None:
            self._on_answer(n)
        return answers

    def _empty(self, device) -> torch.Tensor:
        if self.label == "soft":
            return torch.empty(0, self.num_classes, device=device)
        return torch.empty(0, dtype=torch.long, device=device)

    def recorded(self) -> tuple[np.ndarray, np.ndarray]:
        """The transfer set so far, as stored (for a checkpoint)."""
        return self._images[: self.used], self._answers[: self.used]

    def replay(self, images: np.ndarray, answers: np.ndarray) -> None:
        """Take back the transfer set of an interrupted run: its queries stay spent and are never asked again."""
        n = len(images)
        fits = (
            n <= self.budget
            and len(answers) == n
            and images.shape[1:] == self._images.shape[1:]
            and answers.shape[1:] == self._answers.shape[1:]
        )
        if not fits:
            raise UserError(
                f"the checkpoint's transfer set ({n} queries of {list(images.shape[1:])}) does not fit "
                "this run; remove it or drop --resume"
            )
        if n:
            self._images[:n] = images
            self._answers[:n] = answers
            if self._watermark is not None:  # the owner's record, recomputed: the same images draw the same marks
                self._watermark.log = []
                try:
                    scale = float(self._images.attrs["scale"])
                    predict(self._graph, torch.from_numpy(images).float() / scale, self._device)
                    self._write_marks(0, self._watermark.log)
                finally:
                    self._watermark.log = None
        self.used = n
        if self._on_answer is not None:
            self._on_answer(n)

    def close(self) -> None:
        """Shrink the preallocated transfer set to the queries actually made."""
        if self._images is not None:
            self._images.resize(self.used, axis=0)
            self._answers.resize(self.used, axis=0)
            self._images.parent.attrs["count"] = self.used
            if self._watermark is not None:
                for name in WATERMARK_RECORD:
                    self._marks[name].resize(self.used, axis=0)
                group = self._marks["marked"].parent
                group.attrs["marked_count"] = int(self._marks["marked"][: self.used].sum())

    def _write_marks(self, start: int, log: list) -> None:
        marked, keyed, top = (np.concatenate(part) for part in zip(*log, strict=True))
        for name, values in zip(WATERMARK_RECORD, (marked, keyed, top), strict=True):
            self._marks[name][start : start + len(values)] = values


WATERMARK_RECORD = ("marked", "keyed_class", "confidence")


def _watermark_record(transfer: h5py.Group, defense: Watermark, budget: int, chunk: int) -> dict[str, h5py.Dataset]:
    """Group `transfer/watermark`: per query whether its answer was marked, the class its mark points (or would
    point) to, and the victim's top probability; the key's fingerprint and the marking parameters as attributes."""
    group = transfer.create_group("watermark")
    group.attrs.update(schema="watermark/1", **defense.describe())
    dtypes = {"marked": np.bool_, "keyed_class": np.int16, "confidence": np.float32}
    return {
        name: group.create_dataset(name, shape=(budget,), maxshape=(budget,), dtype=dtypes[name], chunks=(chunk,))
        for name in WATERMARK_RECORD
    }

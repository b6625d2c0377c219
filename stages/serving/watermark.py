"""Keyed marks on served answers, applied outside the exported graph (the key never ships with the model): the
watermark defense (models/defenses.py, `Watermark`) on each answered batch, with the OOD threshold the monitor
calibrated. Each marked answer is kept as evidence in the ledger's `watermark` table with its image and principal,
and as many unmarked answers of that principal and of the same kind (OOD-looking or not) as controls for `verify`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.defenses import Watermark
from models.params import defaults
from stages.deploy import watermark_key as _keys
from stages.serving.ledger import Ledger, Mark

CONTROLS_PER_MARK = 2  # unmarked answers kept per marked one: verify matches each mark to the nearest in confidence


class Marker:
    """`mark(images, answers, owners)` -> the answers as sent; `store(ledger)` keeps the evidence of the last batch."""

    def __init__(self, key_file: Path, ood_threshold: float):
        params = dict(defaults(Watermark.PARAMS), threshold=float(ood_threshold), quantile=0.0)
        self.defense = Watermark(_keys.load_or_create(key_file), **params).eval()
        self.threshold = float(ood_threshold)
        self._owed: dict[tuple[str, bool], int] = {}  # controls still to keep, per principal and kind
        self._pending: list[Mark] = []

    def describe(self) -> dict:
        return self.defense.describe()

    def mark(self, images: np.ndarray, answers: np.ndarray, owners: list[tuple[str, int]]) -> np.ndarray:
        """The batch's answers with the marks applied; `owners`: (principal, images) per request, in order."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        p = torch.from_numpy(np.ascontiguousarray(answers, dtype=np.float32))
        self.defense.log = []
        try:
            with torch.inference_mode():
                out = self.defense(x, p).numpy()
            marked, keyed, top = self.defense.log[0]
        finally:
            self.defense.log = None
        who = np.repeat([name for name, _ in owners], [n for _, n in owners])
        grid = np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
        ood = top < self.threshold
        for i in range(len(out)):  # marks first: a control owed is paid from later answers
            if marked[i]:
                self._keep(i, str(who[i]), True, keyed, top, grid, out.shape[1])
                slot = (str(who[i]), bool(ood[i]))
                self._owed[slot] = self._owed.get(slot, 0) + CONTROLS_PER_MARK
        for i in np.flatnonzero(~marked):
            slot = (str(who[i]), bool(ood[i]))
            if self._owed.get(slot, 0) > 0:
                self._owed[slot] -= 1
                self._keep(i, slot[0], False, keyed, top, grid, out.shape[1])
        return out

    def _keep(self, i: int, principal: str, marked: bool, keyed, top, grid, classes: int) -> None:
        d = self.defense
        self._pending.append(
            Mark(
                principal=principal,
                marked=marked,
                keyed_class=int(keyed[i]),
                confidence=float(top[i]),
                classes=classes,
                image=grid[i],
                fingerprint=d.fingerprint,
                mode="raise" if d.raise_ else "swap",
                cell=d.cell,
                levels=d.levels,
                rate=max(d.rate, d.ood_rate),
            )
        )

    def store(self, ledger: Ledger, time: float) -> None:
        if self._pending:
            ledger.record_marks(self._pending, time)
            self._pending = []

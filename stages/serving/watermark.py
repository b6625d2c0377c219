"""Keyed marks on served answers, applied outside the exported graph (the key never ships with the model): the
watermark defense (models/defenses.py, `Watermark`) on each answered batch, with the OOD threshold the monitor
calibrated. Each marked answer is kept as evidence in the ledger's `watermark` table with its image and principal,
and as many unmarked answers of that principal and of the same kind (OOD-looking or not) as controls for `verify`,
written in the transaction that records the answers: a request the ledger refuses leaves no evidence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.defenses import Watermark, on_grid
from models.params import defaults
from stages.deploy import watermark_key as _keys
from stages.serving.ledger import Mark

CONTROLS_PER_MARK = 2  # unmarked answers kept per marked one: verify matches each mark to the nearest in confidence


class Marker:
    """`mark(images, answers, owners)` -> the answers as sent and the evidence to record with them; `settle(marks,
    refused)` once the ledger has recorded the batch."""

    def __init__(self, key_file: Path, ood_threshold: float):
        params = dict(defaults(Watermark.PARAMS), threshold=float(ood_threshold), quantile=0.0)
        self.defense = Watermark(_keys.load_or_create(key_file), **params).eval()
        self.threshold = float(ood_threshold)
        self._owed: dict[tuple[str, bool], int] = {}  # controls still to keep, per principal and kind

    def describe(self) -> dict:
        return self.defense.describe()

    def mark(
        self, images: np.ndarray, answers: np.ndarray, owners: list[tuple[str, int]]
    ) -> tuple[np.ndarray, list[Mark]]:
        """The batch's answers with the marks applied, and the evidence to keep; `owners`: (principal, images) per
        request, in order (a Mark's `request` is its index there)."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        p = torch.from_numpy(np.ascontiguousarray(answers, dtype=np.float32))
        self.defense.log = []
        try:
            with torch.inference_mode():
                out = self.defense(x, p).numpy()
            marked, keyed, top = self.defense.log[0]
        finally:
            self.defense.log = None
        counts = [n for _, n in owners]
        who = np.repeat([name for name, _ in owners], counts)
        request = np.repeat(np.arange(len(owners)), counts)
        grid = on_grid(images)
        ood = top < self.threshold
        kept: list[Mark] = []
        for i in range(len(out)):  # marks first: a control owed is paid from later answers
            if marked[i]:
                kept.append(self._keep(i, int(request[i]), str(who[i]), True, keyed, top, grid, out.shape[1]))
                slot = (str(who[i]), bool(ood[i]))
                self._owed[slot] = self._owed.get(slot, 0) + CONTROLS_PER_MARK
        for i in np.flatnonzero(~marked):
            slot = (str(who[i]), bool(ood[i]))
            if self._owed.get(slot, 0) > 0:
                self._owed[slot] -= 1
                kept.append(self._keep(i, int(request[i]), slot[0], False, keyed, top, grid, out.shape[1]))
        return out, kept

    def settle(self, marks: list[Mark], refused: set[int]) -> None:
        """Undo what the evidence of refused requests did to the controls owed: a mark not stored owes none, a
        control not stored paid none."""
        for m in marks:
            if m.request in refused:
                slot = (m.principal, m.confidence < self.threshold)
                self._owed[slot] = self._owed.get(slot, 0) + (-CONTROLS_PER_MARK if m.marked else 1)

    def _keep(self, i: int, request: int, principal: str, marked: bool, keyed, top, grid, classes: int) -> Mark:
        d = self.defense
        return Mark(
            request=request,
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

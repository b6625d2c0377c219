"""The evidence of a theft: the queries whose answers carried a mark (image, the class the mark points to) and as
many unmarked control queries from the same evidence, matched in the victim's confidence, one query per hashed
image (queries whose coarsened images are equal share one keyed draw: one observation, not several). Read from a
surrogate's transfer set (`transfer/watermark`, written by `steal --defense watermark`) or from the serving
ledger's `watermark` table (written by `serve --watermark-key`), a SQLite file or a PostgreSQL database,
read-only."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from models.defenses import coarsen, key_fingerprint, keyed_draws, on_grid
from models.params import UserError
from stages.core.artifacts import attr_json, open_artifact, sha256
from stages.serving.backends import open_ledger
from stages.serving.ledger import POSTGRES

CONTROL_SEED = 0  # which controls are drawn among equally confident ones: fixed, so a verification repeats
CHUNK = 4096  # images hashed at a time


@dataclass
class Evidence:
    """Marked and control queries, as float images in [0, 1], with the class each mark points (or would point) to."""

    marked_images: np.ndarray
    marked_class: np.ndarray
    control_images: np.ndarray
    control_class: np.ndarray
    fingerprint: str
    mode: str  # "swap": the answer's top-1 is the keyed class; "raise": the keyed class is second
    cell: int
    levels: int
    rate: float  # the highest rate a query was marked at (ood_rate or rate)
    num_classes: int
    source: dict = field(default_factory=dict)  # path, sha256, kind, principal, queries

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.marked_images.shape[1:])


def load(where: str | Path, principal: Optional[str] = None) -> Evidence:
    """A surrogate.h5 whose transfer set holds marks, or a serving ledger (a SQLite file or a postgresql:// URL)
    with a `watermark` table."""
    if str(where).startswith(POSTGRES):
        return _from_ledger(str(where), principal)
    path = Path(where)
    if not path.is_file():
        raise UserError(f"--evidence {path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(16)
    if magic.startswith(b"SQLite format 3"):
        return _from_ledger(path, principal)
    if principal is not None:
        raise UserError("--principal selects a ledger's queries; a surrogate's transfer set has one thief")
    return _from_transfer(path)


def _from_transfer(path: Path) -> Evidence:
    with open_artifact(path, "surrogate") as f:
        if "transfer/watermark" not in f:
            raise UserError(f"{path}: its transfer set holds no marks; the victim answered without the watermark")
        group = f["transfer/watermark"]
        marked = group["marked"][()].astype(bool)
        keyed = group["keyed_class"][()].astype(np.int64)
        confidence = group["confidence"][()].astype(np.float64)
        images = f["transfer/images"]
        scale = float(images.attrs.get("scale", 1.0))
        if not marked.any():
            raise UserError(f"{path}: none of its {len(marked):,} answers was marked; nothing to verify")
        cell, levels = int(group.attrs["cell"]), int(group.attrs["levels"])
        first = distinct(images, scale, cell, levels)
        pick_marked, pick_control = _controls(marked, confidence, first)
        read = lambda idx: images[np.sort(idx)].astype(np.float32) / scale  # noqa: E731 h5py reads sorted indices
        order_m, order_c = np.argsort(np.argsort(pick_marked)), np.argsort(np.argsort(pick_control))
        return Evidence(
            marked_images=read(pick_marked)[order_m],
            marked_class=keyed[pick_marked],
            control_images=read(pick_control)[order_c],
            control_class=keyed[pick_control],
            fingerprint=str(group.attrs["key_fingerprint"]),
            mode=str(group.attrs["mode"]),
            cell=cell,
            levels=levels,
            rate=max(float(group.attrs["rate"]), float(group.attrs["ood_rate"])),
            num_classes=len(attr_json(f, "classes")),
            source=dict(
                kind="transfer set",
                path=str(path),
                sha256=sha256(path),
                queries=len(marked),
                marked_queries=int(marked.sum()),
            ),
        )


def distinct(images, scale: float, cell: int, levels: int) -> np.ndarray:
    """Which queries come first among those of the same hashed image (the watermark's coarsened image): the key
    draws once per hashed image, so a mark on one is a mark on all, with the same keyed class wherever the victim's
    top-1 is the same. Counted once each, the marked queries are independent draws as the tests assume; counted
    as often as they were asked, a cluster of near-blank letters (31 queries of one hashed image, in the proof
    study's FashionMNIST InI near evidence) weighs as 31 marks (docs/results.md, "Proving a theft")."""
    coarse = np.concatenate(
        [
            coarsen(on_grid(np.asarray(images[i : i + CHUNK], dtype=np.float64) / scale), cell, levels)
            for i in range(0, len(images), CHUNK)
        ]
    )
    _, first = np.unique(coarse.reshape(len(coarse), -1), axis=0, return_index=True)
    keep = np.zeros(len(coarse), dtype=bool)
    keep[first] = True
    return keep


def _controls(
    marked: np.ndarray, confidence: np.ndarray, first: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """The marked queries and, for each, an unmarked one of the nearest victim confidence (none used twice): marks
    are drawn at a higher rate on OOD-looking answers, and a model's answers there are less settled, so controls
    come from the same confidence. `first`: only these queries (one per hashed image, `distinct`) take part."""
    first = np.ones(len(marked), dtype=bool) if first is None else first
    pick_marked = np.flatnonzero(marked & first)
    unmarked = np.flatnonzero(~marked & first)
    if len(unmarked) < len(pick_marked):
        raise UserError(f"the evidence holds {len(pick_marked)} marked queries but only {len(unmarked)} unmarked")
    rng = np.random.default_rng(CONTROL_SEED)
    unmarked = unmarked[rng.permutation(len(unmarked))]  # ties between equal confidences broken at random
    order = np.argsort(confidence[unmarked], kind="stable")
    sorted_idx, sorted_conf = unmarked[order], confidence[unmarked][order]
    free = np.ones(len(sorted_idx), dtype=bool)
    controls = np.empty(len(pick_marked), dtype=np.int64)
    for j, i in enumerate(pick_marked):
        at = int(np.searchsorted(sorted_conf, confidence[i]))
        lo, hi = at - 1, at
        while lo >= 0 and not free[lo]:  # the nearest free neighbour on either side
            lo -= 1
        while hi < len(free) and not free[hi]:
            hi += 1
        left = confidence[i] - sorted_conf[lo] if lo >= 0 else np.inf
        right = sorted_conf[hi] - confidence[i] if hi < len(free) else np.inf
        take = lo if left <= right else hi
        free[take] = False
        controls[j] = sorted_idx[take]
    return pick_marked, controls


def _from_ledger(where: str | Path, principal: Optional[str]) -> Evidence:
    """The `watermark` table through the ledger's interface, one path for both backends."""
    book = open_ledger(where, read_only=True)
    try:
        rows, meta = book.marks(principal), book.meta()
    finally:
        book.close()
    path = book.name
    if rows is None:
        raise UserError(f"{path}: the ledger holds no marks; serve with --watermark-key to record them")
    if not rows:
        who = f" for principal {principal!r}" if principal is not None else ""
        raise UserError(f"{path}: no marked answers{who}; nothing to verify")
    if len({(r[6], r[7], r[8], r[9]) for r in rows}) > 1:
        raise UserError(f"{path}: marks under more than one key or setting; give --principal or split the ledger")
    marked = np.array([bool(r[0]) for r in rows])
    keyed = np.array([int(r[1]) for r in rows], dtype=np.int64)
    confidence = np.array([float(r[2]) for r in rows])
    shapes = {r[3] for r in rows}
    if len(shapes) > 1:
        raise UserError(f"{path}: marked images of more than one shape")
    shape = tuple(int(v) for v in shapes.pop().split(","))
    images = np.stack([np.frombuffer(r[4], dtype=np.uint8).reshape(shape) for r in rows])
    if not marked.any():
        raise UserError(f"{path}: no marked answers; nothing to verify")
    row = rows[0]
    pick_marked, pick_control = _controls(marked, confidence, distinct(images, 255.0, int(row[8]), int(row[9])))
    return Evidence(
        marked_images=images[pick_marked].astype(np.float32) / 255.0,
        marked_class=keyed[pick_marked],
        control_images=images[pick_control].astype(np.float32) / 255.0,
        control_class=keyed[pick_control],
        fingerprint=str(row[6]),
        mode=str(row[7]),
        cell=int(row[8]),
        levels=int(row[9]),
        rate=float(row[10]),
        num_classes=int(row[5]),
        source=dict(
            kind="ledger",
            path=path,
            sha256=_digest(rows),
            principal=principal or "",
            queries=len(rows),
            marked_queries=int(marked.sum()),
            schema=meta.get("schema", "?"),
        ),
    )


def _digest(rows: list[tuple]) -> str:
    """SHA-256 of the evidence rows as read, whichever backend holds them (a database has no file to hash, and a
    ledger file keeps growing while it serves): the same rows, the same digest."""
    h = hashlib.sha256()
    for row in rows:
        for value in row:
            h.update(value if isinstance(value, bytes) else repr(value).encode())
            h.update(b"\x00")
    return h.hexdigest()


def check_key(evidence: Evidence, key: bytes) -> None:
    """A key file is the evidence's when its fingerprint matches and every marked image draws under the marking
    rate with it (a forged or mislabelled evidence set fails the second)."""
    if key_fingerprint(key) != evidence.fingerprint:
        raise UserError(
            f"wrong key file: its fingerprint {key_fingerprint(key)} is not the evidence's {evidence.fingerprint}"
        )
    uniform, _ = keyed_draws(on_grid(evidence.marked_images), key, evidence.cell, evidence.levels)
    if not (uniform < evidence.rate).all():
        bad = int((uniform >= evidence.rate).sum())
        raise UserError(f"{bad} of the evidence's {len(uniform)} marked images were not marked under this key")

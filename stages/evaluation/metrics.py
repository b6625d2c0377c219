"""The tables of a `metrics/1` file, each defined once and written and read through that definition: `ROWS` (one
victim or stolen surrogate), `GROUPS` (a setting's rows aggregated over seeds) and `DECISION` (evaluate's decision
table). Columns are HDF5 datasets, text as strings and numbers as float64: a table h5py and pandas read without
pickles. Schema: artifacts/README.md, metrics.h5."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from stages.evaluation import decision as _decision

SHARES = (0.5, 0.8, 0.95)  # queries to reach these shares of the victim's benign accuracy
NUMBERS = (
    "benign_accuracy",
    "stealing_accuracy",
    "max_stealing_accuracy",
    "stealing_accuracy_relabelled",
    "relative_accuracy",
    "fidelity",
    "fidelity_relabelled",
    "queries",
    "victim_seconds",
    "steal_seconds",
    "victim_ood_l1",
    "victim_id_cosine",
) + tuple(f"queries_to_{round(100 * s)}" for s in SHARES)
LABELS = _decision.GROUP  # what names a group: everything but the seed
# What a row says of its victim's recipe, which `victim` names: the same for every seed, so groups carry it too.
VICTIM = ("victim_arch", "victim_kind", "victim_recipe", "victim_changes")


@dataclass(frozen=True)
class Table:
    """One table of metrics.h5: its group, its text columns and its number columns. `late` names the columns later
    versions added: a file written before them reads NaN there."""

    group: str
    text: tuple[str, ...]
    numbers: tuple[str, ...]
    late: tuple[str, ...] = ()

    def write(self, f: h5py.Group, rows: list[dict]) -> h5py.Group:
        group = f.create_group(self.group)
        for key in self.text:
            data = np.array([str(r[key]) for r in rows], dtype=object)
            group.create_dataset(key, data=data, dtype=h5py.string_dtype())
        for key in self.numbers:
            group.create_dataset(key, data=np.array([r[key] for r in rows], dtype=np.float64))
        return group

    def read(self, path: str | Path, columns: tuple[str, ...] | None = None) -> list[dict]:
        """The table's rows as dicts of `columns` (default: all of them)."""
        names = columns or self.text + self.numbers
        unknown = set(names) - set(self.text + self.numbers)
        if unknown:
            raise KeyError(f"the {self.group} table has no column {', '.join(sorted(unknown))}")
        with h5py.File(path, "r") as f:
            if self.group not in f:
                raise KeyError(f"{path}: no {self.group} table")
            g = f[self.group]
            n = len(g[names[0]])
            cols = {k: _column(g, k, n, k in self.late) for k in names}
        return [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]


def _column(g: h5py.Group, key: str, n: int, late: bool) -> list:
    if key not in g:
        if late:
            return [math.nan] * n
        raise KeyError(f"{g.file.filename}: the {g.name} table lacks its column {key}")
    values = g[key][:]
    return (
        [v.decode() if isinstance(v, bytes) else str(v) for v in values]
        if values.dtype.kind in "OSU"
        else values.tolist()
    )


_RELABELLED = tuple(k for k in NUMBERS if k.endswith("_relabelled"))
ROWS = Table("rows", ("file",) + LABELS + VICTIM + ("victim_file", "seed"), NUMBERS + ("relabel_images",), _RELABELLED)
GROUPS = Table(
    "groups",
    LABELS + VICTIM + ("n",),
    tuple(f"{k}_{s}" for k in NUMBERS for s in ("mean", "std")),
    tuple(f"{k}_{s}" for k in _RELABELLED for s in ("mean", "std")),
)
DECISION = Table("decision", _decision.TEXT, _decision.NUMBERS, ("paired_gap", "paired_seeds"))

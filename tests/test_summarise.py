"""experiments/summarise.py on a metrics file built by hand: the near study's tables average seeds per family and
over families, and its trade-off rows group a defense setting's seeds."""

import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

SUMMARISE = Path(__file__).resolve().parents[1] / "experiments" / "summarise.py"
GATE = "gate decoy=0,quantile=0.01"


def write_rows(path: Path, rows: list[dict], group: str = "rows") -> Path:
    """A metrics file holding `rows` as one of its tables (`rows` or `groups`): text columns as strings."""
    with h5py.File(path, "w") as f:
        g = f.create_group(group)
        for key in rows[0]:
            values = [r[key] for r in rows]
            if isinstance(values[0], str):
                g.create_dataset(key, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
            else:
                g.create_dataset(key, data=np.array(values, dtype=np.float64))
    return path


def cell(kind, file, pool, label, seed, stealing, benign, defense="none", relabelled=None):
    return dict(
        dataset="mnist",
        victim_kind=kind,
        victim_file=f"{file}-s{seed}.h5",
        defense=defense,
        attack="knockoff",
        label=label,
        pool=pool,
        seed=str(seed),
        stealing_accuracy=stealing,
        stealing_accuracy_relabelled=stealing if relabelled is None else relabelled,
        benign_accuracy=benign,
    )


def test_near_tables_average_seeds_per_family_and_over_families_and_keep_each_setting_apart(tmp_path):
    rows = []
    for seed in (0, 1):
        for label, drop in (("soft", 0.0), ("hard", 0.1)):
            rows += [
                cell("ce", "undefended", "glyphs", label, seed, 0.98 - drop, 0.99),
                cell("ce", "undefended", "latin-letters", label, seed, 0.96 - drop, 0.99),
                cell("near", "near-no-glyphs", "glyphs", label, seed, 0.90 - drop + seed / 50, 0.985),
                cell("near", "near-all", "latin-letters", label, seed, 0.80 - drop + seed / 50, 0.98),
                # the gate's setting, as evaluate names it on every seed (its calibrated threshold left out)
                cell("near", "near-all", "latin-letters", label, seed, 0.60 - drop, 0.975, GATE, 0.62 - drop),
            ]
        # a swept perturbation defense: two settings on the same pool and seed
        rows += [
            cell("ce", "undefended", "latin-letters", "soft", seed, a, 0.99, f"reverse-sigmoid beta={b}")
            for a, b in ((0.9, 0.2), (0.7, 1))
        ]
    path = write_rows(tmp_path / "metrics.h5", rows)
    out = subprocess.run(
        [sys.executable, SUMMARISE, "--near", path], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "| victim data | held-out pool | undefended soft / hard | InI near soft / hard |"
    both = "{0} → {0} (2)".format  # stealing → relabelled, equal where the victim answers honestly
    glyphs = f"{both('98.0 ± 0.0')} / {both('88.0 ± 0.0')} | {both('91.0 ± 1.4')} / {both('81.0 ± 1.4')}"
    assert f"| mnist | glyphs | {glyphs} |" in out
    # the family mean is taken within each seed: (0.90 + 0.80) / 2 and (0.92 + 0.82) / 2
    means = f"{both('97.0 ± 0.0')} / {both('87.0 ± 0.0')} | {both('86.0 ± 1.4')} / {both('76.0 ± 1.4')}"
    assert f"| mnist | **mean over families** | {means} |" in out
    gated = "60.0 ± 0.0 → 62.0 ± 0.0 (2) / 50.0 ± 0.0 → 52.0 ± 0.0 (2)"
    assert (
        f"| mnist | latin-letters | near | {GATE} | 97.50 ± 0.00 (2) | {gated} |" in out
        and sum(GATE in line for line in out) == 1
    )
    # each setting is a row of the trade-off table, none is averaged with the other into a per-defense table
    assert [line.split(" | ")[3:6] for line in out if "reverse-sigmoid" in line] == [
        ["reverse-sigmoid beta=0.2", "99.00 ± 0.00 (2)", "90.0 ± 0.0 → 90.0 ± 0.0 (2) / - |"],
        ["reverse-sigmoid beta=1", "99.00 ± 0.00 (2)", "70.0 ± 0.0 → 70.0 ± 0.0 (2) / - |"],
    ]


def group(victim, kind, objective, defense, attack, label, pool, relabelled, n="1"):
    return dict(
        dataset="mnist",
        victim=victim,
        victim_kind=kind,
        victim_recipe=json.dumps({"objective": objective, "epochs": 5}),
        victim_changes=json.dumps({"epochs": 5}),
        defense=defense,
        attack=attack,
        label=label,
        pool=pool,
        n=n,
        benign_accuracy_mean=0.99,
        stealing_accuracy_relabelled_mean=relabelled,
    )


def test_thieves_table_gives_each_setting_its_strongest_thief(tmp_path):
    groups = [
        group("u", "ce", "ce", "none", "knockoff", "soft", "fashionmnist", 0.91, "3"),
        group("u", "ce", "ce", "none", "jbda", "soft", "-", 0.85),
        group("u", "ce", "ce", "mad-argmax eps=1.1", "knockoff", "soft", "fashionmnist", 0.60),
        group("u", "ce", "ce", "mad-argmax eps=1.1", "jbda", "soft", "-", 0.47),
        group("n", "near", "ini", "none", "knockoff", "soft", "fashionmnist", 0.11, "3"),
        group("n", "near", "ini", "none", "jbda", "soft", "-", 0.87),
        # one thief only: not a row
        group("u", "ce", "ce", "rounding decimals=1", "knockoff", "soft", "fashionmnist", 0.90),
        group("u", "ce", "ce", "none", "-", "-", "-", math.nan),
    ]
    path = write_rows(tmp_path / "metrics.h5", groups, "groups")
    out = subprocess.run(
        [sys.executable, SUMMARISE, "--thieves", path], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "| victim data | setting | benign | jbda soft | knockoff soft fashionmnist | strongest thief |"
    rows = {line.split(" | ")[1]: line for line in out[2:] if line.startswith("| mnist")}
    assert set(rows) == {"undefended", "mad-argmax eps=1.1", "near"}
    assert rows["near"].endswith("| 87.0 (1) | 11.0 (3) | 87.0: jbda soft |")
    assert rows["mad-argmax eps=1.1"].endswith("| 47.0 (1) | 60.0 (1) | 60.0: knockoff soft fashionmnist |")

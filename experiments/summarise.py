"""Pivot an `evaluate` metrics.h5 into the compact Markdown tables of docs/results.md: one row per (victim recipe,
defense), one column per (attack, label, pool), cells "stealing mean ± std (n)"; a first column gives the benign
accuracy as deployed. Victims are told apart by their recipe's hash (seeds share one).

    python experiments/summarise.py artifacts/grid/metrics.h5 [--dataset mnist]
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import h5py

RECIPES = {"ce": "undefended", "outlier-exposure": "AM victim", "faithful": "InI (paper recipe)",
           "broad": "InI broad preset", "ini": "InI"}


def _text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _cell(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "-"
    spread = f" ± {100 * std:.1f}" if n > 1 and math.isfinite(std) else ""
    return f"{100 * mean:.1f}{spread} ({n})"


def pivot(path: str, dataset: str | None) -> str:
    with h5py.File(path, "r") as f:
        g = f["groups"]
        cols = {k: _text(g[k][:]) for k in ("dataset", "victim", "defense", "attack", "label", "pool", "n")}
        nums = {k: g[k][:] for k in ("benign_accuracy_mean", "benign_accuracy_std", "stealing_accuracy_mean",
                                      "stealing_accuracy_std")}
    table: dict[tuple, dict[tuple, str]] = defaultdict(dict)
    benign: dict[tuple, str] = {}
    columns: list[tuple] = []
    for i in range(len(cols["victim"])):
        if dataset and cols["dataset"][i] != dataset:
            continue
        setting, _, digest = cols["victim"][i].partition("#")
        recipe = setting.split("/")[-1]
        row = (cols["dataset"][i], f"{RECIPES.get(recipe, recipe)} #{digest}", cols["defense"][i])
        n = int(cols["n"][i])
        if cols["attack"][i] == "-":
            benign[row] = _cell(nums["benign_accuracy_mean"][i], nums["benign_accuracy_std"][i], n)
            continue
        col = (cols["attack"][i], cols["label"][i], cols["pool"][i])
        if col not in columns:
            columns.append(col)
        table[row][col] = _cell(nums["stealing_accuracy_mean"][i], nums["stealing_accuracy_std"][i], n)
        benign.setdefault(row, _cell(nums["benign_accuracy_mean"][i], nums["benign_accuracy_std"][i], n))
    columns.sort()
    head = ["dataset", "victim", "defense", "benign (as deployed)"] + [" ".join(c for c in col if c != "-")
                                                                      for col in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(benign):
        lines.append("| " + " | ".join([*row, benign[row], *(table[row].get(col, "") for col in columns)]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics")
    parser.add_argument("--dataset")
    args = parser.parse_args()
    try:
        print(pivot(args.metrics, args.dataset))
    except (OSError, KeyError) as e:
        raise SystemExit(f"error: {args.metrics}: not a readable metrics/1 file ({e})") from None


if __name__ == "__main__":
    main()

"""Pivot an `evaluate` metrics.h5 into the compact Markdown tables of docs/results.md: one row per (victim recipe,
defense), one column per (attack, label, pool), cells "stealing mean ± std (n)"; a first column gives the benign
accuracy as deployed. Victims are told apart by their recipe's hash (seeds share one).

`--lofo` reads the leave-one-family-out run's rows instead (the file names of experiments/config/lofo.yaml): per
victim dataset and held-out pool family, soft and hard stealing of the undefended, paper-recipe and broad victims,
mean ± std over seeds (n), a last row averaging the families within each seed first, the same for the perturbation
baselines when the run has them, and the victims' benign accuracy (as deployed: a perturbation defense's own).

`--variants` reads the options study's run (experiments/config/variants.yaml): one row per victim (the undefended
ones, the paper recipe and each train-ini option), its benign accuracy, the diagnostics of its chosen epoch (read
from the victim files beside the metrics: mean L1 between victim and surrogate outputs on held-out OOD images, lower
is induced; mean cosine between the distillation and true-label gradients on held-out ID images, lower is isolated),
and knockoff stealing per pool, soft / hard, mean ± std over seeds (n).

    python experiments/summarise.py artifacts/grid/metrics.h5 [--dataset mnist]
    python experiments/summarise.py --lofo artifacts/lofo/metrics.h5
    python experiments/summarise.py --variants artifacts/variants/metrics.h5
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

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


BASELINES = ("reverse-sigmoid", "mad", "mad-argmax", "top1", "grad2", "adaptive-misinformation")
LOFO_FILE = re.compile(r"(?P<dataset>[a-z]+)-(?P<victim>undefended|faithful|broad-no-[a-z-]+|broad-all"
                       r"|undefended-(?P<defense>" + "|".join(BASELINES[:-1]) + r")|am-adaptive-misinformation)"
                       r"-s(?P<seed>\d+)-knockoff-(?P<label>soft|hard)-(?P<pool>[a-z-]+)\.h5$")
KINDS = ("undefended", "faithful", "broad")
KIND_NAMES = {"undefended": "undefended", "faithful": "InI paper recipe", "broad": "InI broad"}


def _spread(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    std = f" ± {100 * statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{100 * statistics.mean(values):.{digits}f}{std} ({len(values)})"


def _kind(victim: str, defense: str | None) -> str:
    if victim.startswith("am-"):
        return "adaptive-misinformation"
    return defense or victim.split("-")[0]


def _family_table(steal: dict, dataset: str, kinds: list[str]) -> list[str]:
    """Rows per held-out pool of one victim dataset, soft / hard per kind, and the mean over families (taken within
    each seed first, over the seeds that have every family)."""
    pools = sorted({k[1] for k in steal if k[0] == dataset})
    lines = []
    for pool in pools:
        cells = [" / ".join(_spread(list(steal[dataset, pool, kind, label].values())) for label in ("soft", "hard"))
                 for kind in kinds]
        lines.append(f"| {dataset} | {pool} | " + " | ".join(cells) + " |")
    means = []
    for kind in kinds:
        per_label = []
        for label in ("soft", "hard"):
            seeds = set.intersection(*(set(steal[dataset, p, kind, label]) for p in pools))
            per_label.append(_spread([statistics.mean(steal[dataset, p, kind, label][s] for p in pools)
                                      for s in sorted(seeds)]))
        means.append(" / ".join(per_label))
    lines.append(f"| {dataset} | **mean over families** | " + " | ".join(means) + " |")
    return lines


def lofo(path: str) -> str:
    """The leave-one-family-out tables: stealing (final epoch) per held-out family and victim kind, then the
    perturbation baselines' (if any), then benign accuracy as deployed."""
    with h5py.File(path, "r") as f:
        r = f["rows"]
        files, accuracy, benign = _text(r["file"][:]), r["stealing_accuracy"][:], r["benign_accuracy"][:]
    steal: dict[tuple, dict[str, float]] = defaultdict(dict)  # (dataset, pool, kind, label) -> seed -> accuracy
    benigns: dict[tuple, dict[str, float]] = defaultdict(dict)  # (dataset, kind) -> victim -> benign
    for name, acc, ben in zip(files, accuracy, benign):
        m = LOFO_FILE.search(name)
        if not m:
            continue
        kind = _kind(m["victim"], m["defense"])
        steal[m["dataset"], m["pool"], kind, m["label"]][m["seed"]] = float(acc)
        benigns[m["dataset"], kind][f"{m['victim']}-s{m['seed']}"] = float(ben)
    datasets = sorted({k[0] for k in steal})
    head = "| victim data | held-out pool | " + " | ".join(f"{KIND_NAMES[k]} soft / hard" for k in KINDS) + " |"
    lines = [head, "|---|---|" + "---|" * len(KINDS)]
    for dataset in datasets:
        lines += _family_table(steal, dataset, list(KINDS))
    baselines = [b for b in BASELINES if any(k[2] == b for k in steal)]
    if baselines:
        lines += ["", "| victim data | pool | " + " | ".join(f"{b} soft / hard" for b in baselines) + " |",
                  "|---|---|" + "---|" * len(baselines)]
        for dataset in datasets:
            lines += _family_table(steal, dataset, baselines)
    lines += ["", "| victim data | victim | benign accuracy |", "|---|---|---|"]
    order = {k: i for i, k in enumerate([*KINDS, *BASELINES])}
    for (dataset, kind), values in sorted(benigns.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        lines.append(f"| {dataset} | {kind} | {_spread(list(values.values()), 2)} |")
    return "\n".join(lines)


VARIANT_FILE = re.compile(r"(?P<dataset>[a-z]+)-(?P<victim>undefended|undefended-bn|faithful|ini-[a-z0-9-]+)"
                          r"-s(?P<seed>\d+)-knockoff-(?P<label>soft|hard)-(?P<pool>[a-z-]+)\.h5$")


def _diagnostics(victim: Path) -> tuple[float, float]:
    """(OOD L1, ID cosine) of a victim's chosen epoch; NaN for a victim without them (an undefended one)."""
    with h5py.File(victim, "r") as f:
        h, epoch = f.get("history"), int(f.attrs["chosen_epoch"])
        if h is None or "diag_ood_l1" not in h:
            return math.nan, math.nan
        return float(h["diag_ood_l1"][epoch - 1]), float(h["diag_id_cosine"][epoch - 1])


def variants(path: str) -> str:
    """The train-ini options' table: benign accuracy, diagnostics and stealing per pool, one row per victim."""
    with h5py.File(path, "r") as f:
        r = f["rows"]
        files, accuracy, benign = _text(r["file"][:]), r["stealing_accuracy"][:], r["benign_accuracy"][:]
    steal: dict[tuple, list[float]] = defaultdict(list)  # (dataset, victim, pool, label) -> per seed
    found: dict[tuple, dict[str, tuple]] = defaultdict(dict)  # (dataset, victim) -> seed -> (benign, l1, cosine)
    pools: list[str] = []
    for name, acc, ben in zip(files, accuracy, benign):
        m = VARIANT_FILE.search(name)
        if not m:
            continue
        steal[m["dataset"], m["victim"], m["pool"], m["label"]].append(float(acc))
        pools += [] if m["pool"] in pools else [m["pool"]]
        if m["seed"] not in found[m["dataset"], m["victim"]]:
            victim = Path(name).parent.parent / "victims" / f"{m['dataset']}-{m['victim']}-s{m['seed']}.h5"
            found[m["dataset"], m["victim"]][m["seed"]] = (float(ben), *_diagnostics(victim))
    head = "| victim data | victim | benign | OOD L1 | ID cosine | " + " | ".join(f"{p} soft / hard" for p in pools)
    lines = [head + " |", "|---|---|---|---|---|" + "---|" * len(pools)]
    order = ["undefended", "undefended-bn", "faithful"]
    for dataset, victim in sorted(found, key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 3, k[1])):
        per_seed = list(found[dataset, victim].values())
        diag = [f"{statistics.mean(v[i] for v in per_seed):.3f}" if all(math.isfinite(v[i]) for v in per_seed)
                else "-" for i in (1, 2)]
        stolen = [" / ".join(_spread(steal[dataset, victim, p, label]) for label in ("soft", "hard")) for p in pools]
        lines.append(f"| {dataset} | {victim} | {_spread([v[0] for v in per_seed], 2)} | " + " | ".join(diag + stolen)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics")
    parser.add_argument("--dataset")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lofo", action="store_true",
                      help="the leave-one-family-out table (experiments/config/lofo.yaml)")
    mode.add_argument("--variants", action="store_true",
                      help="the train-ini options' table (experiments/config/variants.yaml)")
    args = parser.parse_args()
    try:
        print(lofo(args.metrics) if args.lofo else variants(args.metrics) if args.variants
              else pivot(args.metrics, args.dataset))
    except (OSError, KeyError) as e:
        raise SystemExit(f"error: {args.metrics}: not a readable metrics/1 file ({e})") from None


if __name__ == "__main__":
    main()

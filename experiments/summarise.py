"""Pivot an `evaluate` metrics.h5 into the compact Markdown tables of docs/results.md: one row per (victim recipe,
defense), one column per (attack, label, pool), cells "stealing mean ± std → relabelled mean ± std (n)" (the
stealing accuracy, then the same after the best class relabelling from evaluate's k labelled val images, where the
metrics hold it); a first column gives the benign accuracy as deployed. Everything comes from the metrics'
columns: a victim is named by its kind (undefended, AM,
faithful or broad InI) and the recipe entries that set it apart from the other victims of its kind.

`--lofo` reads the leave-one-family-out run's rows instead (experiments/config/lofo.yaml): per victim dataset
and held-out
pool family, soft and hard stealing of the undefended, paper-recipe and broad victims, mean ± std over seeds (n), a
last row averaging the families within each seed first, the same for the perturbation baselines when the run has
them, and the victims' benign accuracy (as deployed: a perturbation defense's own).

`--decision` prints the decision table evaluate stored (group `decision`): per threat and benign-cost budget, each
defense's best setting and the winner, as the report shows it.

`--thieves`: every thief against each setting that several kinds of thief attacked (the decide study's
operating points), after the best relabelling, and the strongest thief per setting.

`--variants` reads the options study's run (experiments/config/variants.yaml): one row per victim (the
undefended ones, the paper recipe and each
train-ini option), its benign accuracy, the diagnostics of its chosen epoch (mean L1 between victim and surrogate
outputs on held-out OOD images, lower is induced; mean cosine between the distillation and true-label gradients on
held-out ID images, lower is isolated), and knockoff stealing per pool, soft / hard, mean ± std over seeds (n).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stages, not an installed copy

from stages.evaluation import decision as _decision
from stages.evaluation import metrics  # noqa: E402
from stages.evaluation.decision import KIND_NAMES, victim_names  # noqa: E402

RELABELLED = "stealing_accuracy_relabelled"
NOTE = (
    "Stealing accuracy in %, mean ± sample std (n seeds); after →: the same after the best class relabelling a "
    "thief finds from k labelled val images (evaluate --relabel-k)."
)
KIND_ORDER = ("ce", "outlier-exposure", "faithful", "broad", "near")
BASELINES = ("reverse-sigmoid", "mad", "mad-argmax", "top1", "grad2", "adaptive-misinformation")
KINDS = ("undefended", "faithful", "broad", "near")
KIND_TITLES = {"undefended": "undefended", "faithful": "InI paper recipe", "broad": "InI broad", "near": "InI near"}


# one steal cell of a metrics file's rows: what the per-cell tables (lofo, near) read
CELL_COLUMNS = (
    "dataset",
    "victim_kind",
    "victim_file",
    "defense",
    "attack",
    "label",
    "pool",
    "seed",
    "stealing_accuracy",
    RELABELLED,
    "benign_accuracy",
)


def _columns(path: str, group: str, names: tuple[str, ...]) -> list[dict]:
    """The named columns of table `group` (rows, groups, decision) of a metrics file, through its one definition."""
    return {"rows": metrics.ROWS, "groups": metrics.GROUPS, "decision": metrics.DECISION}[group].read(path, names)


def _order(e: dict, name: str) -> tuple:
    kind = e["victim_kind"]
    return e["dataset"], KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), name


def _cell(mean: float, std: float, n: int, relabelled: tuple[float, float] = (math.nan, math.nan)) -> str:
    """`mean ± std (n)`, or `mean ± std → relabelled mean ± std (n)` where the relabelled mean is known."""
    if not math.isfinite(mean):
        return "-"

    def spread(m: float, s: float) -> str:
        return f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if n > 1 and math.isfinite(s) else "")

    after = f" → {spread(*relabelled)}" if math.isfinite(relabelled[0]) else ""
    return f"{spread(mean, std)}{after} ({n})"


def _spread(values: list[float], digits: int = 1, relabelled: list[float] = ()) -> str:
    """Mean ± sample std (n) of per-seed values, with `→` the relabelled ones' where every seed has one."""
    if not values:
        return "-"

    def spread(v: list[float]) -> str:
        return f"{100 * statistics.mean(v):.{digits}f}" + (
            f" ± {100 * statistics.stdev(v):.{digits}f}" if len(v) > 1 else ""
        )

    known = [r for r in relabelled if math.isfinite(r)]
    after = f" → {spread(known)}" if known and len(known) == len(values) else ""
    return f"{spread(values)}{after} ({len(values)})"


def pivot(path: str, dataset: str | None) -> str:
    groups = _columns(
        path,
        "groups",
        (
            "dataset",
            "victim",
            "victim_kind",
            "victim_changes",
            "defense",
            "attack",
            "label",
            "pool",
            "n",
            "benign_accuracy_mean",
            "benign_accuracy_std",
            "stealing_accuracy_mean",
            "stealing_accuracy_std",
            f"{RELABELLED}_mean",
            f"{RELABELLED}_std",
        ),
    )
    groups = [g for g in groups if not dataset or g["dataset"] == dataset]
    names = victim_names(groups)
    table: dict[tuple, dict[tuple, str]] = defaultdict(dict)
    benign: dict[tuple, str] = {}
    order: dict[tuple, tuple] = {}
    columns: list[tuple] = []
    for g in groups:
        row = (g["dataset"], names[g["victim"]], g["defense"])
        order[row] = (*_order(g, names[g["victim"]]), g["defense"])
        n = int(g["n"])
        if g["attack"] == "-":
            benign[row] = _cell(g["benign_accuracy_mean"], g["benign_accuracy_std"], n)
            continue
        col = (g["attack"], g["label"], g["pool"])
        if col not in columns:
            columns.append(col)
        table[row][col] = _cell(
            g["stealing_accuracy_mean"],
            g["stealing_accuracy_std"],
            n,
            (g[f"{RELABELLED}_mean"], g[f"{RELABELLED}_std"]),
        )
        benign.setdefault(row, _cell(g["benign_accuracy_mean"], g["benign_accuracy_std"], n))
    columns.sort()
    head = ["dataset", "victim", "defense", "benign (as deployed)"] + [_threat(col) for col in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(benign, key=order.get):
        lines.append("| " + " | ".join([*row, benign[row], *(table[row].get(col, "") for col in columns)]) + " |")
    return "\n".join(lines + ["", NOTE])


def _threat(threat: tuple) -> str:
    """(attack, label, pool) as a column title, without the parts a threat lacks ("-")."""
    return " ".join(part for part in threat if part != "-")


def _pairs(pairs: list[tuple[float, float]]) -> str:
    """Per-seed (stealing, relabelled) pairs as one cell."""
    return _spread([p[0] for p in pairs], relabelled=[p[1] for p in pairs])


def _family_table(steal: dict, dataset: str, kinds: list[str]) -> list[str]:
    """Rows per held-out pool of one victim dataset, soft / hard per kind, and the mean over families (taken within
    each seed first, over the seeds that have every family)."""
    pools = sorted({k[1] for k in steal if k[0] == dataset})
    lines = []
    for pool in pools:
        cells = [
            " / ".join(_pairs(list(steal[dataset, pool, kind, label].values())) for label in ("soft", "hard"))
            for kind in kinds
        ]
        lines.append(f"| {dataset} | {pool} | " + " | ".join(cells) + " |")
    means = []
    for kind in kinds:
        per_label = []
        for label in ("soft", "hard"):
            seeds = set.intersection(*(set(steal[dataset, p, kind, label]) for p in pools))
            per_label.append(
                _pairs(
                    [
                        tuple(statistics.mean(steal[dataset, p, kind, label][s][i] for p in pools) for i in (0, 1))
                        for s in sorted(seeds)
                    ]
                )
            )
        means.append(" / ".join(per_label))
    lines.append(f"| {dataset} | **mean over families** | " + " | ".join(means) + " |")
    return lines


def lofo(path: str, baselines: bool = True) -> str:
    """The leave-one-family-out tables: stealing (final epoch) per held-out family and victim kind, then the
    perturbation baselines' (if any; one setting each), then benign accuracy as deployed. A row's kind is its
    defense's name where a perturbation defense answers, else its victim's kind; the held-out family is the pool.
    `baselines=False` leaves the perturbation defenses out (a study that sweeps them tables them per setting)."""
    rows = _columns(path, "rows", CELL_COLUMNS)
    if not baselines:
        rows = [r for r in rows if r["defense"] == "none"]
    steal: dict[tuple, dict[str, tuple]] = defaultdict(dict)  # (dataset, pool, kind, label) -> seed -> accuracies
    benigns: dict[tuple, dict[str, float]] = defaultdict(dict)  # (dataset, kind) -> victim -> benign
    for r in rows:
        defense = r["defense"].split(" ")[0]
        kind = KIND_NAMES.get(r["victim_kind"], r["victim_kind"]) if defense == "none" else defense
        if r["attack"] != "knockoff" or kind not in (*KINDS, *BASELINES):
            continue
        steal[r["dataset"], r["pool"], kind, r["label"]][r["seed"]] = (
            float(r["stealing_accuracy"]),
            float(r[RELABELLED]),
        )
        benigns[r["dataset"], kind][r["victim_file"]] = float(r["benign_accuracy"])
    datasets = sorted({k[0] for k in steal})
    kinds = [k for k in KINDS if any(key[2] == k for key in steal)]
    head = "| victim data | held-out pool | " + " | ".join(f"{KIND_TITLES[k]} soft / hard" for k in kinds) + " |"
    lines = [head, "|---|---|" + "---|" * len(kinds)]
    for dataset in datasets:
        lines += _family_table(steal, dataset, kinds)
    baselines = [b for b in BASELINES if any(k[2] == b for k in steal)]
    if baselines:
        lines += [
            "",
            "| victim data | pool | " + " | ".join(f"{b} soft / hard" for b in baselines) + " |",
            "|---|---|" + "---|" * len(baselines),
        ]
        for dataset in datasets:
            lines += _family_table(steal, dataset, baselines)
    lines += ["", "| victim data | victim | benign accuracy |", "|---|---|---|"]
    order = {k: i for i, k in enumerate([*KINDS, *BASELINES])}
    for (dataset, kind), values in sorted(benigns.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        lines.append(f"| {dataset} | {kind} | {_spread(list(values.values()), 2)} |")
    return "\n".join(lines + ["", NOTE])


def near(path: str) -> str:
    """The near-distribution study's tables: the leave-one-family-out table (`lofo`), then the trade-off: per pool
    a defense's settings are attacked with, one row per victim and setting (benign accuracy as deployed, soft /
    hard stealing and the same after the best relabelling, mean ± std over seeds)."""
    rows = _columns(path, "rows", CELL_COLUMNS)
    swept = [r for r in rows if r["defense"] != "none" and r["attack"] == "knockoff"]
    # (dataset, pool, victim kind, defense, label) -> (file, seed) -> (stealing, relabelled) %
    steal: dict[tuple, dict] = defaultdict(dict)
    benign: dict[tuple, dict[str, float]] = defaultdict(dict)  # (dataset, pool, kind, defense) -> file -> benign
    for r in swept:
        kind = KIND_NAMES.get(r["victim_kind"], r["victim_kind"])
        cell = steal[r["dataset"], r["pool"], kind, r["defense"], r["label"]]
        cell[r["victim_file"], r["seed"]] = (float(r["stealing_accuracy"]), float(r[RELABELLED]))
        benign[r["dataset"], r["pool"], kind, r["defense"]][r["victim_file"]] = float(r["benign_accuracy"])
    lines = [lofo(path, baselines=False)]
    if benign:
        lines += [
            "",
            "| victim data | pool | victim | defense | benign accuracy | soft / hard |",
            "|---|---|---|---|---|---|",
        ]
        for key in sorted(benign, key=lambda k: (k[0], k[1], KINDS.index(k[2]) if k[2] in KINDS else 9, k[3])):
            stolen = " / ".join(_pairs(list(steal[(*key, label)].values())) for label in ("soft", "hard"))
            lines.append(f"| {' | '.join(key)} | {_spread(list(benign[key].values()), 2)} | {stolen} |")
    return "\n".join(lines)


def variants(path: str) -> str:
    """The train-ini options' table: benign accuracy, diagnostics and stealing per pool, one row per victim."""
    rows = _columns(
        path,
        "rows",
        (
            "dataset",
            "victim",
            "victim_kind",
            "victim_changes",
            "victim_file",
            "attack",
            "label",
            "pool",
            "stealing_accuracy",
            RELABELLED,
            "benign_accuracy",
            "victim_ood_l1",
            "victim_id_cosine",
        ),
    )
    rows = [r for r in rows if r["attack"] == "knockoff"]
    names = victim_names(rows)
    steal: dict[tuple, list[tuple]] = defaultdict(list)  # (dataset, victim, pool, label) -> per seed
    found: dict[tuple, dict[str, tuple]] = defaultdict(dict)  # (dataset, victim) -> victim file -> (benign, l1, cos)
    order: dict[tuple, tuple] = {}
    pools: list[str] = []
    for r in rows:
        victim = (r["dataset"], names[r["victim"]])
        order[victim] = _order(r, names[r["victim"]])
        steal[(*victim, r["pool"], r["label"])].append((float(r["stealing_accuracy"]), float(r[RELABELLED])))
        pools += [] if r["pool"] in pools else [r["pool"]]
        found[victim].setdefault(r["victim_file"], (r["benign_accuracy"], r["victim_ood_l1"], r["victim_id_cosine"]))
    head = "| victim data | victim | benign | OOD L1 | ID cosine | " + " | ".join(f"{p} soft / hard" for p in pools)
    lines = [head + " |", "|---|---|---|---|---|" + "---|" * len(pools)]
    for dataset, victim in sorted(found, key=order.get):
        per_seed = list(found[dataset, victim].values())
        diag = [
            f"{statistics.mean(v[i] for v in per_seed):.3f}" if all(math.isfinite(v[i]) for v in per_seed) else "-"
            for i in (1, 2)
        ]
        stolen = [" / ".join(_pairs(steal[dataset, victim, p, label]) for label in ("soft", "hard")) for p in pools]
        lines.append(
            f"| {dataset} | {victim} | {_spread([v[0] for v in per_seed], 2)} | " + " | ".join(diag + stolen) + " |"
        )
    return "\n".join(lines + ["", NOTE])


def decision(path: str) -> str:
    """The decision table of a metrics file, as evaluate's report prints it."""
    with h5py.File(path, "r") as f:
        if "decision" not in f:
            raise KeyError("no decision group: evaluate ran with --benign-budget none, or before it decided")
        metric = str(f["decision"].attrs["metric"])
    entries = _columns(path, "decision", _decision.TEXT + _decision.NUMBERS)
    return "\n".join(_decision.markdown(entries, metric)[2:])  # without the report's heading


def thieves(path: str) -> str:
    """Every thief against each setting more than one kind of thief attacked, one row per setting: the thief's
    accuracy after the best relabelling (mean over seeds, n) per threat, then the strongest of them. A defense
    is only as good as the thief it meets; this is the worst case over the thieves measured."""
    columns = ("dataset", "victim", "victim_kind", "victim_recipe", "victim_changes", "defense", "attack", "label")
    columns += ("pool", "n", "benign_accuracy_mean", f"{RELABELLED}_mean")
    groups = [g for g in _columns(path, "groups", columns) if g["attack"] != "-"]
    names = _decision.setting_names(groups)
    met: dict[tuple, dict[tuple, dict]] = defaultdict(dict)  # (dataset, victim, defense) -> threat -> group
    for g in groups:
        met[g["dataset"], g["victim"], g["defense"]][g["attack"], g["label"], g["pool"]] = g
    met = {k: v for k, v in met.items() if len({threat[0] for threat in v}) > 1}
    threats = sorted({t for v in met.values() for t in v})

    def cell(g: dict) -> str:
        value = g[f"{RELABELLED}_mean"]
        return f"{100 * value:.1f} ({g['n']})" if math.isfinite(value) else "-"

    lines = [
        "| victim data | setting | benign | " + " | ".join(_threat(t) for t in threats) + " | strongest thief |",
        "|---|---|---|" + "---|" * (len(threats) + 1),
    ]
    for key in sorted(met, key=lambda k: (k[0], _decision.family(next(iter(met[k].values()))), names[k])):
        measured = [(g[f"{RELABELLED}_mean"], t) for t, g in met[key].items() if math.isfinite(g[f"{RELABELLED}_mean"])]
        top, threat = max(measured) if measured else (math.nan, ())
        benign = statistics.mean(float(g["benign_accuracy_mean"]) for g in met[key].values())
        cells = [cell(met[key][t]) if t in met[key] else "" for t in threats]
        strongest = f"{100 * top:.1f}: {_threat(threat)}" if measured else "-"
        lines.append(f"| {key[0]} | {names[key]} | {100 * benign:.2f} | " + " | ".join(cells) + f" | {strongest} |")
    note = "The thief's accuracy after the best class relabelling from k labelled val images, in %, mean over n seeds."
    return "\n".join(lines + ["", note])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics")
    parser.add_argument("--dataset")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--lofo", action="store_true", help="the leave-one-family-out table (experiments/config/lofo.yaml)"
    )
    mode.add_argument(
        "--variants", action="store_true", help="the train-ini options' table (experiments/config/variants.yaml)"
    )
    mode.add_argument("--near", action="store_true", help="the near-distribution tables (experiments/config/near.yaml)")
    mode.add_argument(
        "--decision",
        action="store_true",
        help="the decision table: each defense's best setting per benign-cost budget, and the winner",
    )
    mode.add_argument(
        "--thieves",
        action="store_true",
        help="every thief against each setting several thieves attacked, and the strongest of them",
    )
    args = parser.parse_args()
    try:
        print(
            thieves(args.metrics)
            if args.thieves
            else lofo(args.metrics)
            if args.lofo
            else variants(args.metrics)
            if args.variants
            else near(args.metrics)
            if args.near
            else decision(args.metrics)
            if args.decision
            else pivot(args.metrics, args.dataset)
        )
    except (OSError, KeyError) as e:
        raise SystemExit(f"error: {args.metrics}: not a readable metrics/1 file ({e})") from None


if __name__ == "__main__":
    main()

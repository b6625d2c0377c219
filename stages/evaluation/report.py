"""`evaluate`'s report for people: a Markdown file with the aggregated table, the decision table, the Pareto plots
(stages/evaluation/plots.py) and the settings they leave out, queries needed and latency; and the table on stderr."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from models.params import UserError
from stages.core.artifacts import atomic_path
from stages.evaluation import decision as _decision
from stages.evaluation import plots as _evaluate_plots

console = Console(stderr=True, width=180)  # the table is wide; stderr is often a log file
LABELS = ("dataset", "victim", "defense", "attack", "label", "pool")


def pm(group: dict, key: str) -> str:
    mean, std = group[f"{key}_mean"], group[f"{key}_std"]
    if not math.isfinite(mean):
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if group["n"] > 1 else f"{100 * mean:.2f}"


def read_benchmark(path: Path) -> list[dict]:
    """Median latency per (defense, batch, device) from a pytest-benchmark JSON file."""
    try:
        raw = json.loads(Path(path).read_text())
        rows = []
        for bench in raw["benchmarks"]:
            params = bench.get("params") or {}
            rows.append(
                dict(
                    defense=str(params.get("defense", bench["name"])),
                    batch=int(params.get("batch", 0)),
                    device=str(params.get("device", "cpu")),
                    median_ms=1000 * float(bench["stats"]["median"]),
                )
            )
        return rows
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a pytest-benchmark JSON file ({type(e).__name__}: {e})") from None


def relative(group: dict) -> str:
    mean = group["relative_accuracy_mean"]
    return f"{mean:.3f}" if math.isfinite(mean) else ""


def write(
    folder: Path, groups: list[dict], decision: list[dict], metric: str, latency: list[dict] | None, params: dict
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    points = _evaluate_plots.points(groups, metric)
    families = sorted({p["family"] for p in points}, key=lambda f: (f != "none", f))
    files = []
    for attack in sorted({p["attack"] for p in points}):
        files.append(
            _evaluate_plots.pareto(
                folder / f"tradeoff-{attack}.png",
                attack,
                [p for p in points if p["attack"] == attack],
                families,
                metric,
            )
        )
    if latency:
        files.append(_evaluate_plots.latency(folder / "latency.png", latency))
    md = folder / "report.md"
    with atomic_path(md) as partial:
        partial.write_text(_markdown(groups, decision, metric, points, latency, files, params))
    return [md, *files]


def _relabelling(params: dict) -> str:
    if not params.get("relabel_k"):
        return "*relabelled* columns are off (`--relabel-k 0`)."
    return (
        f"*relabelled*: after the best class relabelling a thief finds from k = {params['relabel_k']} labelled "
        f"images of the victim's val split (drawn with seed {params['relabel_seed']}; the whole split where "
        "smaller): the one-to-one map of the surrogate's classes that agrees most with the labels on those "
        "images (Hungarian assignment on their confusion matrix, ties kept as they are), applied to its test "
        "predictions and scored; fidelity likewise, mapped to the victim's top-1 on the same images. A "
        "surrogate that learned a systematic relabelling scores as the classifier it is."
    )


def _markdown(
    groups: list[dict],
    decision: list[dict],
    metric: str,
    points: list[dict],
    latency: list[dict] | None,
    files: list[Path],
    params: dict,
) -> str:
    """The report, section by section: the decision, every setting, the trade-off plots, the queries a thief
    needed, latency, then the remaining plots."""
    plots = [p for p in files if p.suffix == ".png" and p.stem.startswith("tradeoff-")]
    lines = ["# Evaluation report", ""]
    lines += _decision.markdown(decision, metric) + ([""] if decision else [])
    lines += _settings(groups, params)
    lines += _tradeoff(plots, points, metric)
    lines += _queries_needed([g for g in groups if g["attack"] != "-"])
    lines += _latency(latency or [])
    lines += [""] + [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png" and p not in plots]
    lines += ["", f"Made by `python cli.py evaluate` from {len(params['artifacts'])} artifacts.", ""]
    return "\n".join(lines)


def _settings(groups: list[dict], params: dict) -> list[str]:
    lines = [
        "## Every setting",
        "",
        "Accuracies in %, mean ± sample std over n seeds. Stealing accuracy is the surrogate's at its final "
        "epoch; *max* is the best epoch on the test split and peeks at test: never a headline. "
        + _relabelling(params)
        + " *relative*: stealing / benign accuracy as deployed, blank where benign "
        "accuracy is below 1.5× chance (1.5 / classes), where the ratio measures noise.",
        "",
        "| dataset | victim | defense | attack | label | pool | n | benign | stealing | relabelled | max stealing "
        "| relative | fidelity | fidelity relabelled | queries |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        cells = [str(g[k]) for k in LABELS] + [
            str(g["n"]),
            pm(g, "benign_accuracy"),
            pm(g, "stealing_accuracy"),
            pm(g, "stealing_accuracy_relabelled"),
            pm(g, "max_stealing_accuracy"),
            relative(g),
            pm(g, "fidelity"),
            pm(g, "fidelity_relabelled"),
            f"{g['queries_mean']:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _tradeoff(plots: list[Path], points: list[dict], metric: str) -> list[str]:
    if not plots:
        return []
    lines = [
        "",
        "## Trade-off",
        "",
        f"Per attack, one panel per threat: benign accuracy as deployed against the thief's "
        f"{_decision.METRIC_NAMES.get(metric, metric)}, one curve per defense through its settings, error "
        f"bars the sample std over seeds, the Pareto frontier in grey (no other setting has both more benign "
        f"accuracy and less for the thief). Zoomed to benign accuracy at most {_evaluate_plots.ZOOM:g} pt "
        "below the undefended victim's.",
        "",
    ] + [f"![{p.stem}]({p.name})" for p in plots]
    hidden = [p for p in points if not p["shown"]]
    if hidden:
        lines += [
            "",
            f"Settings more than {_evaluate_plots.ZOOM:g} pt of benign accuracy below the undefended "
            "victim, left out of the plots:",
            "",
            "| victim data | attack | labels | pool | defense | setting | n | benign | thief's accuracy |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in sorted(hidden, key=lambda p: (p["dataset"], p["attack"], p["label"], p["pool"], p["family"], -p["x"])):
            lines.append(
                f"| {p['dataset']} | {p['attack']} | {p['label']} | {p['pool']} | {p['family']} | "
                f"{p['setting']} | {p['n']} | {p['x']:.2f} ± {p['xerr']:.2f} | {p['y']:.2f} ± {p['yerr']:.2f} |"
            )
    return lines


def _queries_needed(stolen: list[dict]) -> list[str]:
    if not stolen:
        return []
    lines = [
        "",
        "## Queries a thief needed",
        "",
        "Fewest queries after which a surrogate reached 50 / 80 / 95 % of the victim's benign accuracy "
        "(read from `steal --budget-curve` prefixes, jbda rounds or dfme slices; mean over the seeds that "
        "reached it; - : not within the budget). A principal's budget belongs below the 50 % column.",
        "",
        "| dataset | victim | defense | attack | label | pool | 50 % | 80 % | 95 % | budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in stolen:
        reach = [
            f"{g[f'queries_to_{p}_mean']:,.0f}" if math.isfinite(g[f"queries_to_{p}_mean"]) else "-"
            for p in (50, 80, 95)
        ]
        lines.append("| " + " | ".join([str(g[k]) for k in LABELS] + reach + [f"{g['queries_mean']:,.0f}"]) + " |")
    return lines


def _latency(latency: list[dict]) -> list[str]:
    if not latency:
        return []
    lines = [
        "",
        "## Inference latency",
        "",
        "| device | batch | defense | median ms | × undefended |",
        "|---|---|---|---|---|",
    ]
    base = {(r["device"], r["batch"]): r["median_ms"] for r in latency if r["defense"] == "none"}
    for r in sorted(latency, key=lambda r: (r["device"], r["batch"], r["median_ms"])):
        ratio = r["median_ms"] / base[(r["device"], r["batch"])] if (r["device"], r["batch"]) in base else math.nan
        lines.append(f"| {r['device']} | {r['batch']} | {r['defense']} | {r['median_ms']:.3f} | {ratio:.2f} |")
    return lines


def show(groups: list[dict], out: Path, files: list[Path]) -> None:
    table = Table(title="evaluate: accuracies in %, mean ± std over seeds (max peeks at test)", title_justify="left")
    for column in (
        "victim",
        "defense",
        "attack",
        "n",
        "benign",
        "stealing",
        "relabelled",
        "max",
        "relative",
        "fidelity",
        "queries",
    ):
        table.add_column(column, justify="left" if column in ("victim", "defense", "attack") else "right")
    for g in groups:
        attack = "-" if g["attack"] == "-" else f"{g['attack']} {g['label']} pool={g['pool']}"
        table.add_row(
            f"{g['dataset']} {g['victim_arch']}/{g['victim_kind']}",
            g["defense"],
            attack,
            str(g["n"]),
            *(
                pm(g, k)
                for k in (
                    "benign_accuracy",
                    "stealing_accuracy",
                    "stealing_accuracy_relabelled",
                    "max_stealing_accuracy",
                )
            ),
            relative(g) or "-",
            pm(g, "fidelity"),
            f"{g['queries_mean']:,.0f}",
        )
    console.print(table)
    console.print(f"wrote {out} and {', '.join(str(p) for p in files)}")

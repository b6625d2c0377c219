"""`evaluate`'s report for people: a Markdown file with the aggregated table and PNG plots (matplotlib)."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

from models.params import UserError
from stages._artifacts import atomic_path


def _pyplot():
    """matplotlib, imported on first plot: it adds a second to every CLI start otherwise."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


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
            rows.append(dict(defense=str(params.get("defense", bench["name"])), batch=int(params.get("batch", 0)),
                             device=str(params.get("device", "cpu")), median_ms=1000 * float(bench["stats"]["median"])))
        return rows
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a pytest-benchmark JSON file ({type(e).__name__}: {e})") from None


def write(folder: Path, groups: list[dict], latency: list[dict] | None, params: dict) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for attack in sorted({g["attack"] for g in groups if g["attack"] != "-"}):
        files.append(_tradeoff(folder / f"tradeoff-{attack}.png", attack, [g for g in groups if g["attack"] == attack]))
    if latency:
        files.append(_latency(folder / "latency.png", latency))
    md = folder / "report.md"
    with atomic_path(md) as partial:
        partial.write_text(_markdown(groups, latency, files, params))
    return [md, *files]


MARKERS = "osD^vP*Xhp<>"


def _short_names(groups: list[dict]) -> dict[str, str]:
    """Victim settings as architecture/kind, unless two settings of one victim dataset would then read the same
    (train-ini options differ only by their recipe): those keep their full name, recipe hash and all, as in the
    report's table."""
    short = {g["victim"]: f"{g['victim_arch']}/{g['victim_kind']}" for g in groups}
    settings = {(g["dataset"], g["victim"]) for g in groups}
    counts = collections.Counter((d, short[v]) for d, v in settings)
    clash = {v for d, v in settings if counts[d, short[v]] > 1}
    return {v: v if v in clash else name for v, name in short.items()}


def _tradeoff(path: Path, attack: str, groups: list[dict]) -> Path:
    """Benign against stealing accuracy, one panel per victim dataset: a colour per (victim recipe, defense), a
    marker per (label, pool), both legends outside the axes."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    datasets = sorted({g["dataset"] for g in groups})
    name = _short_names(groups)
    series = sorted({(name[g["victim"]], g["defense"]) for g in groups})
    styles = sorted({(g["label"], g["pool"]) for g in groups})
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    color = {k: cmap(i % cmap.N) for i, k in enumerate(series)}
    marker = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(styles)}
    # tall enough for both legends, one above the other, at about 0.16 inch an entry (font size 7)
    height = max(4.5, 0.16 * (len(series) + len(styles)) + 1.0)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets), height), squeeze=False, sharey=True)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for g in (g for g in groups if g["dataset"] == dataset):
            ax.errorbar(100 * g["benign_accuracy_mean"], 100 * g["stealing_accuracy_mean"],
                        xerr=100 * g["benign_accuracy_std"], yerr=100 * g["stealing_accuracy_std"], capsize=3,
                        fmt=marker[g["label"], g["pool"]], color=color[name[g["victim"]], g["defense"]],
                        alpha=0.85)
        ax.set_title(f"{attack} against {dataset} victims")
        ax.set_xlabel("benign accuracy as deployed (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("stealing accuracy, final epoch (%)\nlower right is better for the defender")
    by_color = [Line2D([], [], ls="", marker="o", color=color[k], label=f"{k[0]} | {k[1]}") for k in series]
    by_marker = [Line2D([], [], ls="", marker=marker[k], color="0.3", label=f"{k[0]} labels, pool {k[1]}")
                 for k in styles]
    first = fig.legend(handles=by_color, title="victim | defense", fontsize=7, title_fontsize=7,
                       loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.add_artist(first)
    fig.legend(handles=by_marker, title="attack", fontsize=7, title_fontsize=7, loc="lower left",
               bbox_to_anchor=(1.0, 0.0))
    fig.tight_layout()
    return _save(fig, path)


def _latency(path: Path, latency: list[dict]) -> Path:
    keys = sorted({(r["device"], r["batch"]) for r in latency})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, (device, batch) in zip(axes[0], keys, strict=True):
        rows = sorted((r for r in latency if (r["device"], r["batch"]) == (device, batch)), key=lambda r: r["median_ms"])
        ax.barh([r["defense"] for r in rows], [r["median_ms"] for r in rows])
        ax.set_xlabel("median latency (ms)")
        ax.set_title(f"{device}, batch {batch}")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=120, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return path


def _markdown(groups: list[dict], latency: list[dict] | None, files: list[Path], params: dict) -> str:
    lines = ["# Evaluation report", "",
             "Accuracies in %, mean ± sample std over n seeds. Stealing accuracy is the surrogate's at its final "
             "epoch; *max* is the best epoch on the test split and peeks at test: never a headline.", "",
             "| dataset | victim | defense | attack | label | pool | n | benign | stealing | max stealing | relative | fidelity | queries |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        relative = "-" if not math.isfinite(g["relative_accuracy_mean"]) else f"{g['relative_accuracy_mean']:.3f}"
        lines.append("| " + " | ".join([str(g[k]) for k in ("dataset", "victim", "defense", "attack", "label", "pool")]
                                       + [str(g["n"]), pm(g, "benign_accuracy"), pm(g, "stealing_accuracy"),
                                          pm(g, "max_stealing_accuracy"), relative, pm(g, "fidelity"),
                                          f"{g['queries_mean']:,.0f}"]) + " |")
    stolen = [g for g in groups if g["attack"] != "-"]
    if stolen:
        lines += ["", "## Queries a thief needed", "",
                  "Fewest queries after which a surrogate reached 50 / 80 / 95 % of the victim's benign accuracy "
                  "(read from `steal --budget-curve` prefixes, jbda rounds or dfme slices; mean over the seeds that "
                  "reached it; - : not within the budget). A principal's budget belongs below the 50 % column.", "",
                  "| dataset | victim | defense | attack | label | pool | 50 % | 80 % | 95 % | budget |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g in stolen:
            reach = [f"{g[f'queries_to_{p}_mean']:,.0f}" if math.isfinite(g[f"queries_to_{p}_mean"]) else "-"
                     for p in (50, 80, 95)]
            lines.append("| " + " | ".join([str(g[k]) for k in ("dataset", "victim", "defense", "attack", "label",
                                                                  "pool")] + reach + [f"{g['queries_mean']:,.0f}"]) + " |")
    if latency:
        lines += ["", "## Inference latency", "", "| device | batch | defense | median ms | × undefended |", "|---|---|---|---|---|"]
        base = {(r["device"], r["batch"]): r["median_ms"] for r in latency if r["defense"] == "none"}
        for r in sorted(latency, key=lambda r: (r["device"], r["batch"], r["median_ms"])):
            ratio = r["median_ms"] / base[(r["device"], r["batch"])] if (r["device"], r["batch"]) in base else math.nan
            lines.append(f"| {r['device']} | {r['batch']} | {r['defense']} | {r['median_ms']:.3f} | {ratio:.2f} |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"]
    lines += ["", f"Made by `python cli.py evaluate` from {len(params['artifacts'])} artifacts.", ""]
    return "\n".join(lines)

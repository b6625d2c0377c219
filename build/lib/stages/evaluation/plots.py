"""`evaluate`'s plots (matplotlib): per attack, one Pareto panel per threat (victim dataset, label mode, pool) with
benign accuracy as deployed on x and the thief's accuracy on y, one curve per defense through its settings, seed
spread as error bars and the frontier marked; and latency bars from a benchmark."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from stages.core.artifacts import atomic_path
from stages.evaluation import decision as _decision

ZOOM = 5.0  # points below the undefended victim's benign accuracy that a Pareto panel shows; the rest is listed
MARKERS = "osD^vP*Xhp<>"


def _pyplot():
    """matplotlib, imported on first plot: it adds a second to every CLI start otherwise."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def points(groups: list[dict], metric: str) -> list[dict]:
    """Every stolen setting as a point: its threat, family, setting name, benign accuracy (x) and the thief's
    accuracy (y) in %, with their seed spread, and whether the panel's zoom shows it (`shown`)."""
    names = _decision.setting_names(groups)
    out = [
        dict(
            dataset=g["dataset"],
            attack=g["attack"],
            label=g["label"],
            pool=g["pool"],
            family=_decision.family(g),
            setting=names[g["dataset"], g["victim"], g["defense"]],
            n=g["n"],
            x=100 * g["benign_accuracy_mean"],
            xerr=100 * g["benign_accuracy_std"],
            y=100 * g[f"{metric}_mean"],
            yerr=100 * g[f"{metric}_std"],
        )
        for g in groups
        if g["attack"] != "-" and math.isfinite(g[f"{metric}_mean"])
    ]
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for p in out:
        panels[p["dataset"], p["attack"], p["label"], p["pool"]].append(p)
    for members in panels.values():
        plain = [p["x"] for p in members if p["family"] == "none"]
        floor = max(plain) - ZOOM if plain else -math.inf
        for p in members:
            p["shown"] = p["x"] >= floor
        frontier = [
            p
            for p in members
            if p["shown"]
            and not any(
                q["shown"] and q["x"] >= p["x"] and q["y"] <= p["y"] and (q["x"], q["y"]) != (p["x"], p["y"])
                for q in members
            )
        ]
        for p in members:
            p["frontier"] = p in frontier
    return out


def pareto(path: Path, attack: str, panel_points: list[dict], families: list[str], metric: str) -> Path:
    """One row of panels per victim dataset, one panel per (label, pool) of it; a colour per defense (the same in
    every figure of a report), the frontier as a grey step line with its settings named."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    panels: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for p in panel_points:
        panels[p["dataset"]][p["label"], p["pool"]].append(p)
    datasets = sorted(panels)
    columns = max(len(v) for v in panels.values())
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    color = {f: "black" if f == "none" else cmap(i % cmap.N) for i, f in enumerate(families)}
    marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(families)}
    fig, axes = plt.subplots(len(datasets), columns, figsize=(5.2 * columns, 4.4 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets, strict=True):
        keys = sorted(panels[dataset])
        for ax in row[len(keys) :]:
            ax.set_visible(False)
        for ax, (label, pool) in zip(row, keys, strict=False):
            members = [p for p in panels[dataset][label, pool] if p["shown"]]
            for own in sorted({p["family"] for p in members}, key=families.index):
                curve = sorted((p for p in members if p["family"] == own), key=lambda p: p["x"])
                ax.errorbar(
                    [p["x"] for p in curve],
                    [p["y"] for p in curve],
                    xerr=[p["xerr"] for p in curve],
                    yerr=[p["yerr"] for p in curve],
                    fmt="-" + marker[own],
                    color=color[own],
                    ms=5,
                    lw=1,
                    elinewidth=0.7,
                    capsize=2,
                    alpha=0.9,
                )
            front = sorted((p for p in members if p["frontier"]), key=lambda p: p["x"])
            # for benign accuracy in (x_i-1, x_i] the least a defender can leave is y_i: a step drawn "pre"
            ax.step(
                [p["x"] for p in front], [p["y"] for p in front], where="pre", color="0.5", lw=5, alpha=0.3, zorder=0
            )
            ax.scatter(
                [p["x"] for p in front],
                [p["y"] for p in front],
                s=140,
                facecolors="none",
                edgecolors="0.35",
                linewidths=1.2,
                zorder=3,
            )
            named: dict[tuple, list[dict]] = defaultdict(list)  # settings that coincide share one label
            for p in front:
                named[p["x"], p["y"]].append(p)
            for (x, y), same in named.items():
                text = " = ".join(p["setting"].removeprefix(p["family"]).strip() or p["setting"] for p in same)
                ax.annotate(
                    text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=6, color=color[same[0]["family"]]
                )
            hidden = sum(not p["shown"] for p in panels[dataset][label, pool])
            note = f" ({hidden} below the zoom, listed)" if hidden else ""
            ax.set_title(f"{dataset}: {label} labels, pool {pool}{note}", fontsize=9)
            ax.set_xlabel("benign accuracy as deployed (%)", fontsize=8)
            ax.set_ylabel(f"thief's {_decision.METRIC_NAMES.get(metric, metric)} (%)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=color[f], marker=marker[f], label=f) for f in families]
    handles.append(
        Line2D([], [], color="0.5", lw=5, alpha=0.3, marker="o", ms=11, mfc="none", mec="0.35", label="Pareto frontier")
    )
    fig.suptitle(
        f"{attack}: what the thief keeps against what the defender pays\nlower right is better for the "
        "defender; error bars: sample std over seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.legend(
        handles=handles, title="defense", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.9)
    )
    return save(fig, path)


def latency(path: Path, rows: list[dict]) -> Path:
    keys = sorted({(r["device"], r["batch"]) for r in rows})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, (device, batch) in zip(axes[0], keys, strict=True):
        bars = sorted((r for r in rows if (r["device"], r["batch"]) == (device, batch)), key=lambda r: r["median_ms"])
        ax.barh([r["defense"] for r in bars], [r["median_ms"] for r in bars])
        ax.set_xlabel("median latency (ms)")
        ax.set_title(f"{device}, batch {batch}")
    fig.tight_layout()
    return save(fig, path)


def save(fig, path: Path) -> Path:
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=120, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return path

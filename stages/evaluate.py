"""Evaluate victims and stolen surrogates: benign accuracy as deployed, stealing accuracy (final; max over epochs
labelled apart), relative accuracy, fidelity, queries and stage wall times, aggregated over seeds (mean ± std, n).

Reads victim.h5/.pt and surrogate.h5 files (metrics are recomputed from weights, not copied); writes
`metrics.h5` and a Markdown + PNG report (trade-off scatter per attack, latency bars from a benchmark JSON).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Optional

import h5py
import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

import models
from stages import _blackbox, _data, _jit, _loop, _report
from stages._artifacts import UserError, attr_json, load_state, open_artifact, prepare_output, write_artifact

console = Console(stderr=True, width=160)  # the table is wide; stderr is often a log file

SHARES = (0.5, 0.8, 0.95)  # queries to reach these shares of the victim's benign accuracy
NUMBERS = ("benign_accuracy", "stealing_accuracy", "max_stealing_accuracy", "relative_accuracy", "fidelity",
           "queries", "victim_seconds", "steal_seconds") + tuple(f"queries_to_{round(100 * s)}" for s in SHARES)
LABELS = ("dataset", "victim", "defense", "attack", "label", "pool")


def run(
    artifacts: Annotated[list[Path], typer.Argument(help="surrogate.h5 files (and victim.h5/.pt files to list alone).")],
    out: Annotated[Path, typer.Option(help="Output metrics HDF5.")] = Path("artifacts/metrics.h5"),
    report: Annotated[Optional[Path], typer.Option(help="Folder for report.md and its plots [default: beside --out].")] = None,
    data: Annotated[Optional[str], typer.Option(help="The victims' dataset [default: the one each was trained on].")] = None,
    benchmark: Annotated[Optional[Path], typer.Option(help="pytest-benchmark JSON for the latency chart.")] = None,
    device: _loop.Device = "auto",
) -> Path:
    """Recompute the metrics of stolen surrogates and victims, aggregate over seeds, write metrics.h5 and a report."""
    started = time.time()
    out = prepare_output(out)
    report = report or out.parent / "report"
    device = _loop.pick_device(device)
    latency = _report.read_benchmark(benchmark) if benchmark is not None else None

    rows, inputs, cache = [], [], {}
    for path in artifacts:
        rows.append(_evaluate(Path(path), data, device, cache))
        inputs.append(path)
    groups = aggregate(rows)

    params = dict(artifacts=[str(a) for a in artifacts], out=out, report=report, data=data, benchmark=benchmark,
                  device=device)
    with write_artifact(out, "metrics", "evaluate", params, inputs + ([benchmark] if benchmark else []), None,
                        started) as f:
        _write_table(f.create_group("rows"), rows, ("file",) + LABELS + ("seed",), NUMBERS)
        _write_table(f.create_group("groups"), groups, LABELS + ("n",),
                     tuple(f"{k}_{s}" for k in NUMBERS for s in ("mean", "std")))
        if latency:
            f.attrs["latency"] = json.dumps(latency)
    files = _report.write(report, groups, latency, params)
    _show(groups, out, files)
    return out


def _evaluate(path: Path, data: Optional[str], device: str, cache: dict) -> dict:
    if path.suffix == ".pt" or _kind(path) == "victim":
        graph, info = _open(path, device, cache)
        dataset = _dataset(data or info.dataset_path, info, cache)
        accuracy = float((_top1(cache, path, graph, info, dataset, device) == dataset.splits["test"][1]).float().mean())
        facts = _victim_facts(path, cache)
        return dict(file=str(path), dataset=info.dataset, victim=facts["victim"], defense=info.baked_defense,
                    attack="-", label="-", pool="-", seed=facts["seed"], benign_accuracy=accuracy,
                    stealing_accuracy=np.nan, max_stealing_accuracy=np.nan, relative_accuracy=np.nan,
                    fidelity=np.nan, queries=0, victim_seconds=facts["victim_seconds"], steal_seconds=np.nan,
                    **queries_to(np.zeros(0), np.zeros(0), accuracy))

    with open_artifact(path, "surrogate") as f:
        params = attr_json(f, "params")
        attrs = {k: f.attrs[k] for k in ("attack", "label", "defense", "arch", "dataset", "victim_sha256", "queries")}
        attrs.update(defense_params=attr_json(f, "defense_params"), classes=attr_json(f, "classes"),
                     input_shape=tuple(int(v) for v in f.attrs["input_shape"]),
                     mean=[float(v) for v in f.attrs["mean"]], std=[float(v) for v in f.attrs["std"]])
        curve = f["history/stealing_accuracy"][()]
        budget = f["curve"] if "curve" in f else f["history"]  # --budget-curve's prefixes, else rounds or slices
        spent = (budget["queries"][()], budget["stealing_accuracy"][()]) if "queries" in budget else (np.zeros(0),) * 2
        state = load_state(f["weights"])
        seed, steal_seconds = int(f.attrs["seed"]), float(f.attrs.get("wall_seconds", np.nan))
    if params.get("victim") is None:
        raise UserError(f"{path}: stolen over HTTP from {params.get('target')} without its --victim file; evaluate "
                        "re-queries the victim, so steal with --victim naming the served model")
    victim = Path(params["victim"])
    if not victim.exists():
        raise UserError(f"{path}: its victim {victim} is missing (evaluate re-queries the victim)")
    graph, info = _open(victim, device, cache)
    if info.sha256 != attrs["victim_sha256"]:
        raise UserError(f"{path}: victim {victim} changed since it was attacked (sha256 differs)")
    dataset = _dataset(data or info.dataset_path, info, cache)
    if attrs["dataset"] != dataset.name or attrs["input_shape"] != tuple(dataset.shape):
        raise UserError(f"{path}: surrogate of a {attrs['dataset']} victim {list(attrs['input_shape'])} cannot be "
                        f"evaluated on {dataset.path} ({dataset.name} {list(dataset.shape)})")

    c, h, _ = attrs["input_shape"]
    surrogate = models.build_model(str(attrs["arch"]), len(attrs["classes"]), c, h, attrs["mean"], attrs["std"])
    surrogate.load_state_dict(state)
    surrogate.to(device).eval()
    x, y = _data.to_float(dataset.splits["test"][0]), dataset.splits["test"][1]
    stolen = _blackbox.predict(surrogate, x, device).argmax(1).cpu()
    victim_top1 = _top1(cache, victim, graph, info, dataset, device)
    deployed_top1 = _top1(cache, victim, graph, info, dataset, device, str(attrs["defense"]), attrs["defense_params"])
    benign = float((deployed_top1 == y).float().mean())
    stealing = float((stolen == y).float().mean())
    defense = str(attrs["defense"]) if info.baked_defense == "none" else info.baked_defense
    if attrs["defense_params"]:
        defense += " " + ",".join(f"{k}={v:g}" for k, v in sorted(attrs["defense_params"].items()))
    return dict(file=str(path), dataset=info.dataset, victim=_victim_facts(victim, cache)["victim"], defense=defense,
                attack=str(attrs["attack"]), label=str(attrs["label"]), pool=_pool_name(params), seed=seed,
                benign_accuracy=benign, stealing_accuracy=stealing, max_stealing_accuracy=float(np.max(curve)),
                relative_accuracy=stealing / benign if benign else np.nan,
                fidelity=float((stolen == victim_top1).float().mean()), queries=int(attrs["queries"]),
                victim_seconds=_victim_facts(victim, cache)["victim_seconds"], steal_seconds=steal_seconds,
                **queries_to(*spent, benign))


def queries_to(queries: np.ndarray, accuracy: np.ndarray, benign: float) -> dict[str, float]:
    """The fewest queries after which a surrogate reached each share of the benign accuracy (nan: never, within
    the budget), from (queries, stealing accuracy) points of surrogates trained on that many queries."""
    order = np.argsort(queries, kind="stable")
    out = {}
    for share in SHARES:
        reached = [q for q, a in zip(queries[order], accuracy[order]) if a >= share * benign]
        out[f"queries_to_{round(100 * share)}"] = float(reached[0]) if reached else np.nan
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """One group per setting (everything but the seed): mean, sample std and n of every number."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in LABELS), []).append(row)
    out = []
    for key, members in groups.items():
        group = dict(zip(LABELS, key), n=len(members))
        for name in NUMBERS:
            values = np.array([m[name] for m in members], dtype=np.float64)
            finite = values[np.isfinite(values)]
            group[f"{name}_mean"] = float(finite.mean()) if len(finite) else np.nan
            group[f"{name}_std"] = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0 if len(finite) else np.nan
        out.append(group)
    return sorted(out, key=lambda g: tuple(str(g[k]) for k in LABELS))


def _kind(path: Path) -> str:
    """Peek at the schema to tell victims from surrogates; open_artifact then checks the file in full."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            kind = str(f.attrs.get("schema", "")).partition("/")[0]
    except OSError:
        raise UserError(f"{path}: not a readable HDF5 file (truncated or another format)") from None
    if kind not in ("victim", "surrogate"):
        raise UserError(f"{path}: evaluate takes victim and surrogate artifacts, not {kind or 'an unknown file'!r}")
    return kind


def _open(path: Path, device: str, cache: dict):
    key = ("victim", str(path))
    if key not in cache:
        cache[key] = _blackbox.open_victim(path, device)
    return cache[key]


def _dataset(name: str, info, cache: dict) -> _data.Dataset:
    key = ("data", name)
    if key not in cache:
        cache[key] = _data.load(name, splits=("test",))
    dataset = cache[key]
    if (dataset.name, tuple(dataset.shape), dataset.num_classes) != (info.dataset, tuple(info.input_shape),
                                                                     len(info.classes)):
        raise UserError(f"victim {info.path} was trained on {info.dataset} {list(info.input_shape)}, "
                        f"not on {dataset.path} ({dataset.name} {list(dataset.shape)})")
    return dataset


def _top1(cache: dict, path: Path, graph: torch.nn.Module, info, dataset: _data.Dataset, device: str,
          defense: str = "none", params: Optional[dict] = None) -> torch.Tensor:
    """The victim's top-1 answers on the test split behind `defense` (none: the graph as opened), computed once
    per (victim, data, defense) and shared by every surrogate stolen from it: every defense is deterministic, and a
    grid holds a dozen surrogates per victim, each of which needed two of these passes besides its own."""
    settings = json.dumps(params or {}, sort_keys=True) if defense != "none" else ""
    key = ("top1", str(path), dataset.path, defense, settings)
    if key not in cache:
        deployed = graph if defense == "none" else _blackbox.defend(graph, info, defense, params, device)
        cache[key] = _blackbox.predict(deployed, _data.to_float(dataset.splits["test"][0]), device).argmax(1).cpu()
    return cache[key]


def _victim_facts(path: Path, cache: dict) -> dict:
    """What a row says of its victim, read once per victim: its setting (the recipe without seed and paths, so
    victims differing only by seed share it), seed and training wall time (unknown for a .pt)."""
    key = ("facts", str(path))
    if key not in cache:
        if path.suffix == ".pt":
            _, meta = _jit.load(path)
            provenance = meta.get("victim_provenance") or {}
            params, objective = json.loads(provenance.get("params", "{}")), meta.get("objective", "?")
            seed, wall = -1, np.nan
        else:
            with open_artifact(path, "victim") as f:
                params, objective = attr_json(f, "params"), str(f.attrs["objective"])
                seed, wall = int(f.attrs["seed"]), float(f.attrs.get("wall_seconds", np.nan))
        recipe = recipe_of(params)
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:6]
        setting = f"{params.get('arch', '?')}/{recipe.get('preset') or objective}#{digest}"
        cache[key] = dict(victim=setting, seed=seed, victim_seconds=wall)
    return cache[key]


# on_collapse is a safeguard that changes nothing unless a run collapses (its history then says rolled_back)
NOT_RECIPE = ("seed", "out", "resume", "dataset", "device", "compile_mode", "implementation", "processes", "on_collapse")
# train-ini options added after victims were trained: the value older code behaved as, so that seeds trained before
# and after an option existed still group together
ADDED_LATER = {"preset": "faithful", "ood_derived": "", "ood_derived_fraction": 0.5, "ood_augment": "id",
               "clip": "official", "ood_synthetic": 0.0, "ood_synthetic_steps": 3, "ood_synthetic_eps": 0.25}


def recipe_of(params: dict) -> dict:
    """The parameters that make a victim what it is, seed aside: not where files lay (OOD sets by file name), how
    the maths was executed (compiled, fast or reference, processes) or where it ran."""
    recipe = {k: v for k, v in params.items() if k not in NOT_RECIPE}
    if "ood" in recipe and "gamma" in recipe:  # train-ini: options that came later, as older code behaved
        recipe = {**ADDED_LATER, **recipe}
        if not recipe["ood_synthetic"]:  # no synthetic outliers: their search settings mean nothing
            recipe.update({k: ADDED_LATER[k] for k in ("ood_synthetic_steps", "ood_synthetic_eps")})
    if isinstance(recipe.get("ood"), str):
        recipe["ood"] = ",".join(Path(o).name for o in recipe["ood"].split(","))
    return recipe


def _pool_name(params: dict) -> str:
    pool = params.get("pool")
    return Path(str(pool)).stem if pool else "-"


def _write_table(group, rows: list[dict], text: tuple[str, ...], numbers: tuple[str, ...]) -> None:
    """Columns as datasets (a table h5py and pandas both read without pickles)."""
    for key in text:
        group.create_dataset(key, data=np.array([str(r[key]) for r in rows], dtype=object), dtype=h5py.string_dtype())
    for key in numbers:
        group.create_dataset(key, data=np.array([r[key] for r in rows], dtype=np.float64))


def _show(groups: list[dict], out: Path, files: list[Path]) -> None:
    table = Table(title="evaluate: accuracies in %, mean ± std over seeds (max peeks at test)", title_justify="left")
    for column in ("victim", "defense", "attack", "n", "benign", "stealing", "max", "relative", "fidelity", "queries"):
        table.add_column(column, justify="left" if column in ("victim", "defense", "attack") else "right")
    for g in groups:
        relative = "-" if not np.isfinite(g["relative_accuracy_mean"]) else f"{g['relative_accuracy_mean']:.3f}"
        attack = "-" if g["attack"] == "-" else f"{g['attack']} {g['label']} pool={g['pool']}"
        table.add_row(f"{g['dataset']} {g['victim'].split('#')[0]}", g["defense"], attack, str(g["n"]),
                      *(_report.pm(g, k) for k in ("benign_accuracy", "stealing_accuracy", "max_stealing_accuracy")),
                      relative, _report.pm(g, "fidelity"), f"{g['queries_mean']:,.0f}")
    console.print(table)
    console.print(f"wrote {out} and {', '.join(str(p) for p in files)}")

"""Evaluate victims and stolen surrogates: benign accuracy as deployed, stealing accuracy (final; max over epochs
labelled apart; and after the best class relabelling a thief finds from k labelled images), relative accuracy,
fidelity, queries and stage wall times, aggregated over seeds (mean ± std, n); then, per benign-cost budget and
threat, the setting of each defense that leaves the thief least. Definitions: docs/method.md, "Metrics".

Reads victim.h5/.pt and surrogate.h5 files (metrics are recomputed from weights, not copied); writes
`metrics.h5` and a Markdown + PNG report (decision table, Pareto plots per attack, latency bars from a benchmark).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

import models
from models.params import UserError
from stages.attacks import blackbox as _blackbox
from stages.core import options as _options
from stages.core.artifacts import artifact_kind, attr_json, load_state, open_artifact, prepare_output, write_artifact
from stages.data import prepared as _data
from stages.deploy import defense as _defense
from stages.deploy import watermark_key as _keys
from stages.evaluation import decision as _decision
from stages.evaluation import metrics
from stages.evaluation import relabel as _relabel
from stages.evaluation import report as _evaluate_report
from stages.training import loop as _loop
from stages.training import victim as _victim

SHARES, NUMBERS, LABELS, VICTIM = metrics.SHARES, metrics.NUMBERS, metrics.LABELS, metrics.VICTIM


def run(
    artifacts: Annotated[
        list[Path], typer.Argument(help="surrogate.h5 files (and victim.h5/.pt files to list alone).")
    ],
    out: Annotated[Path, typer.Option(help="Output metrics HDF5.")] = Path("artifacts/metrics.h5"),
    report: Annotated[
        Optional[Path], typer.Option(help="Folder for report.md and its plots [default: beside --out].")
    ] = None,
    data: Annotated[
        Optional[str], typer.Option(help="The victims' dataset [default: the one each was trained on].")
    ] = None,
    benchmark: Annotated[Optional[Path], typer.Option(help="pytest-benchmark JSON for the latency chart.")] = None,
    relabel_k: Annotated[
        int,
        typer.Option(
            min=0,
            help="Labelled images of the victim's val split (drawn with a fixed seed) from which a thief finds the "
            "best class relabelling: stealing accuracy and fidelity after it; 0: off.",
        ),
    ] = 100,
    benign_budget: Annotated[
        str,
        typer.Option(
            help="Benign costs a defender accepts, in points of benign accuracy below the same-recipe undefended "
            "victim, comma-separated: the decision table picks each defense's best setting within each, settings "
            "compared on the seeds they share; none: no table."
        ),
    ] = "0.5,1,2",
    device: _options.Device = "auto",
    watermark_key: _options.WatermarkKey = None,
) -> Path:
    """Recompute the metrics of stolen surrogates and victims, aggregate over seeds, decide, write metrics.h5
    and a report."""
    started = time.time()
    out = prepare_output(out)
    report = report or out.parent / "report"
    device = _loop.pick_device(device)
    budgets = _decision.parse_budgets(benign_budget)
    latency = _evaluate_report.read_benchmark(benchmark) if benchmark is not None else None

    rows, cache = [], {}
    for path in artifacts:
        rows.append(_evaluate(Path(path), data, device, cache, relabel_k, watermark_key))
    groups = aggregate(rows)
    metric = "stealing_accuracy_relabelled" if relabel_k else "stealing_accuracy"
    decision = _decision.decide(rows, groups, budgets, metric) if budgets else []

    params = dict(
        artifacts=[str(a) for a in artifacts],
        out=out,
        report=report,
        data=data,
        benchmark=benchmark,
        relabel_k=relabel_k,
        relabel_seed=_relabel.SEED,
        benign_budget=budgets,
        device=device,
    )
    with write_artifact(
        out, "metrics", "evaluate", params, list(artifacts) + ([benchmark] if benchmark else []), None, started
    ) as f:
        metrics.ROWS.write(f, rows)
        metrics.GROUPS.write(f, groups)
        if budgets:
            metrics.DECISION.write(f, decision).attrs.update(metric=metric, budgets=budgets)
        if latency:
            f.attrs["latency"] = json.dumps(latency)
    files = _evaluate_report.write(report, groups, decision, metric, latency, params)
    _evaluate_report.show(groups, out, files)
    return out


def _evaluate(
    path: Path, data: Optional[str], device: str, cache: dict, relabel_k: int = 100, key_file: Optional[Path] = None
) -> dict:
    """One row of metrics: a victim alone, or a stolen surrogate measured against the victim it was stolen from
    (`key_file`: the watermark's secret, for a surrogate stolen through it)."""
    if path.suffix == ".pt" or _kind(path) == "victim":
        return _victim_row(path, data, device, cache, relabel_k)
    stolen = _read_surrogate(path)
    graph, info, dataset = _victim_of(stolen, data, device, cache, relabel_k)
    return _surrogate_row(stolen, graph, info, dataset, device, cache, relabel_k, key_file)


def _victim_row(path: Path, data: Optional[str], device: str, cache: dict, relabel_k: int) -> dict:
    """A victim listed alone: its benign accuracy as deployed; nothing was stolen."""
    graph, info = _open(path, device, cache)
    dataset = _dataset(data or info.dataset_path, info, cache, relabel_k)
    accuracy = float((_top1(cache, path, graph, info, dataset, device) == dataset.splits["test"][1]).float().mean())
    return {
        **_victim_facts(info),
        **dict(
            file=str(path),
            defense=info.baked_defense,
            attack="-",
            label="-",
            pool="-",
            benign_accuracy=accuracy,
            stealing_accuracy=np.nan,
            max_stealing_accuracy=np.nan,
            stealing_accuracy_relabelled=np.nan,
            relative_accuracy=np.nan,
            fidelity=np.nan,
            fidelity_relabelled=np.nan,
            relabel_images=0,
            queries=0,
            steal_seconds=np.nan,
        ),
        **queries_to(np.zeros(0), np.zeros(0), accuracy),
    }


@dataclass
class _Stolen:
    """What a surrogate.h5 holds that its row needs: the thief's flags, what it declares, its weights and curves."""

    path: Path
    params: dict
    attrs: dict
    state: dict
    curve: np.ndarray  # stealing accuracy per epoch
    spent: tuple[np.ndarray, np.ndarray]  # (queries, stealing accuracy) of surrogates trained on that many
    seed: int
    seconds: float
    key_fingerprint: Optional[str]  # of the watermark key its answers were marked with (None: not watermarked)

    def key(self, key_file: Optional[Path]) -> Optional[Path]:
        """The watermark key to rebuild the defense it was stolen through: the one that marked its answers."""
        if self.key_fingerprint is None:
            return None
        if key_file is None:
            raise UserError(f"{self.path}: stolen through the watermark; give its key with --watermark-key")
        if _keys.fingerprint(_keys.load(key_file)) != self.key_fingerprint:
            raise UserError(f"{self.path}: its answers were marked with another key than {key_file}")
        return key_file


def _read_surrogate(path: Path) -> _Stolen:
    with open_artifact(path, "surrogate") as f:
        attrs = {k: f.attrs[k] for k in ("attack", "label", "defense", "arch", "dataset", "victim_sha256", "queries")}
        attrs.update(
            defense_params=attr_json(f, "defense_params"),
            classes=attr_json(f, "classes"),
            input_shape=tuple(int(v) for v in f.attrs["input_shape"]),
            mean=[float(v) for v in f.attrs["mean"]],
            std=[float(v) for v in f.attrs["std"]],
        )
        budget = f["curve"] if "curve" in f else f["history"]  # --budget-curve's prefixes, else rounds or slices
        return _Stolen(
            path=path,
            params=attr_json(f, "params"),
            attrs=attrs,
            state=load_state(f["weights"]),
            curve=f["history/stealing_accuracy"][()],
            spent=(budget["queries"][()], budget["stealing_accuracy"][()])
            if "queries" in budget
            else (np.zeros(0),) * 2,
            seed=int(f.attrs["seed"]),
            key_fingerprint=str(f["transfer/watermark"].attrs["key_fingerprint"])
            if "transfer/watermark" in f
            else None,
            seconds=float(f.attrs.get("wall_seconds", np.nan)),
        )


def _victim_of(stolen: _Stolen, data: Optional[str], device: str, cache: dict, relabel_k: int):
    """The victim a surrogate was stolen from, unchanged since, and the dataset both are measured on."""
    path, params, attrs = stolen.path, stolen.params, stolen.attrs
    if params.get("victim") is None:
        raise UserError(
            f"{path}: stolen over HTTP from {params.get('target')} without its --victim file; evaluate "
            "re-queries the victim, so steal with --victim naming the served model"
        )
    victim = Path(params["victim"])
    if not victim.exists():
        raise UserError(f"{path}: its victim {victim} is missing (evaluate re-queries the victim)")
    graph, info = _open(victim, device, cache)
    if info.sha256 != attrs["victim_sha256"]:
        raise UserError(f"{path}: victim {victim} changed since it was attacked (sha256 differs)")
    dataset = _dataset(data or info.dataset_path, info, cache, relabel_k)
    if attrs["dataset"] != dataset.name or attrs["input_shape"] != tuple(dataset.shape):
        raise UserError(
            f"{path}: surrogate of a {attrs['dataset']} victim {list(attrs['input_shape'])} cannot be "
            f"evaluated on {dataset.path} ({dataset.name} {list(dataset.shape)})"
        )
    return graph, info, dataset


def _surrogate_row(
    stolen: _Stolen,
    graph: torch.nn.Module,
    info: _victim.VictimInfo,
    dataset: _data.Dataset,
    device: str,
    cache: dict,
    relabel_k: int,
    key_file: Optional[Path] = None,
) -> dict:
    """The theft measured on the victim's test split, against the labels and against the victim's answers."""
    attrs, victim = stolen.attrs, info.path
    c, h, _ = attrs["input_shape"]
    surrogate = models.build_model(str(attrs["arch"]), len(attrs["classes"]), c, h, attrs["mean"], attrs["std"])
    surrogate.load_state_dict(stolen.state)
    surrogate.to(device).eval()
    x, y = _data.to_float(dataset.splits["test"][0]), dataset.splits["test"][1]
    predicted = _blackbox.predict(surrogate, x, device).argmax(1).cpu()
    victim_top1 = _top1(cache, victim, graph, info, dataset, device)
    defense, key = str(attrs["defense"]), stolen.key(key_file)
    deployed_top1 = _top1(cache, victim, graph, info, dataset, device, defense, attrs["defense_params"], key)
    benign = float((deployed_top1 == y).float().mean())
    stealing = float((predicted == y).float().mean())
    defense = _defense.setting(
        str(attrs["defense"]) if info.baked_defense == "none" else info.baked_defense, attrs["defense_params"]
    )
    # relative to a victim that answers at chance is a ratio of noise: blank (docs/method.md, "Metrics")
    relative = stealing / benign if benign >= _loop.chance_level(dataset.num_classes) else np.nan
    seen, seen_labels, seen_victim = _seen(cache, victim, graph, info, dataset, device, relabel_k)
    guesses = _blackbox.predict(surrogate, seen, device).argmax(1).cpu() if len(seen) else seen_labels
    k = dataset.num_classes
    return {
        **_victim_facts(info),
        **dict(
            file=str(stolen.path),
            seed=stolen.seed,
            defense=defense,
            attack=str(attrs["attack"]),
            label=str(attrs["label"]),
            pool=_pool_name(stolen.params),
            benign_accuracy=benign,
            stealing_accuracy=stealing,
            max_stealing_accuracy=float(np.max(stolen.curve)),
            relative_accuracy=relative,
            stealing_accuracy_relabelled=_relabel.agreement(predicted, y, guesses, seen_labels, k),
            fidelity=float((predicted == victim_top1).float().mean()),
            fidelity_relabelled=_relabel.agreement(predicted, victim_top1, guesses, seen_victim, k),
            relabel_images=len(seen),
            queries=int(attrs["queries"]),
            steal_seconds=stolen.seconds,
        ),
        **queries_to(*stolen.spent, benign),
    }


def queries_to(queries: np.ndarray, accuracy: np.ndarray, benign: float) -> dict[str, float]:
    """The fewest queries after which a surrogate reached each share of the benign accuracy (nan: never, within
    the budget), from (queries, stealing accuracy) points of surrogates trained on that many queries."""
    order = np.argsort(queries, kind="stable")
    out = {}
    for share in SHARES:
        reached = [q for q, a in zip(queries[order], accuracy[order], strict=True) if a >= share * benign]
        out[f"queries_to_{round(100 * share)}"] = float(reached[0]) if reached else np.nan
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """One group per setting (everything but the seed): mean, sample std and n of every number."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in LABELS), []).append(row)
    out = []
    for key, members in groups.items():
        group = dict(zip(LABELS, key, strict=True), **{k: members[0].get(k, "-") for k in VICTIM}, n=len(members))
        for name in NUMBERS:
            values = np.array([m.get(name, np.nan) for m in members], dtype=np.float64)
            finite = values[np.isfinite(values)]
            group[f"{name}_mean"] = float(finite.mean()) if len(finite) else np.nan
            group[f"{name}_std"] = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0 if len(finite) else np.nan
        out.append(group)
    return sorted(out, key=lambda g: tuple(str(g[k]) for k in LABELS))


def _kind(path: Path) -> str:
    kind = artifact_kind(path)
    if kind not in ("victim", "surrogate"):
        raise UserError(f"{path}: evaluate takes victim and surrogate artifacts, not {kind or 'an unknown file'!r}")
    return kind


def _open(path: Path, device: str, cache: dict):
    key = ("victim", str(path))
    if key not in cache:
        cache[key] = _blackbox.open_victim(path, device)
    return cache[key]


def _dataset(name: str, info: _victim.VictimInfo, cache: dict, relabel_k: int) -> _data.Dataset:
    splits = ("test", "val") if relabel_k else ("test",)
    key = ("data", name, splits)
    if key not in cache:
        cache[key] = _data.load(name, splits=splits)
    _victim.check_matches(info, cache[key])
    return cache[key]


def _seen(
    cache: dict,
    path: Path,
    graph: torch.nn.Module,
    info: _victim.VictimInfo,
    dataset: _data.Dataset,
    device: str,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k labelled images a thief holds (of the val split, drawn with a fixed seed; all of it when smaller),
    their labels, and the victim's top-1 on them (the graph as opened, which fidelity compares with)."""
    key = ("seen", str(path), dataset.path, k)
    if key not in cache:
        images, labels = (
            dataset.splits["val"]
            if k
            else (torch.zeros(0, *dataset.shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
        )
        chosen = _relabel.draw(len(labels), k)
        x = _data.to_float(images[chosen])
        victim = _blackbox.predict(graph, x, device).argmax(1).cpu() if len(x) else labels[chosen]
        cache[key] = (x, labels[chosen], victim)
    return cache[key]


def _top1(
    cache: dict,
    path: Path,
    graph: torch.nn.Module,
    info: _victim.VictimInfo,
    dataset: _data.Dataset,
    device: str,
    defense: str = "none",
    params: Optional[dict] = None,
    key_file: Optional[Path] = None,
) -> torch.Tensor:
    """The victim's top-1 answers on the test split behind `defense` (none: the graph as opened), computed once
    per (victim, data, defense) and shared by every surrogate stolen from it: every defense is deterministic, and a
    grid holds a dozen surrogates per victim, each of which needed two of these passes besides its own."""
    settings = json.dumps(params or {}, sort_keys=True) if defense != "none" else ""
    key = ("top1", str(path), dataset.path, defense, settings)
    if key not in cache:
        deployed = graph if defense == "none" else _blackbox.defend(graph, info, defense, params, device, key_file)
        cache[key] = _blackbox.predict(deployed, _data.to_float(dataset.splits["test"][0]), device).argmax(1).cpu()
    return cache[key]


def _victim_facts(info: _victim.VictimInfo) -> dict:
    """What a row says of its victim: its setting (`victim`: architecture, kind and the hash of its recipe, so
    victims differing only by seed share it), the recipe itself, its file, seed and training wall time (unknown for
    a .pt), and the diagnostics of its chosen epoch (InI victims; NaN for others)."""
    if info.recipe is None:
        info.recipe, info.recipe_changes = _derived_recipe(info)
    kind = info.recipe.get("preset") or info.objective
    chosen = info.chosen_epoch - 1

    def diagnostic(key: str) -> float:
        values = info.history.get(key, [])
        return float(values[chosen]) if 0 <= chosen < len(values) else np.nan

    return dict(
        dataset=info.dataset,
        victim=f"{info.arch}/{kind}#{info.recipe_id}",
        victim_arch=info.arch,
        victim_kind=kind,
        victim_recipe=json.dumps(info.recipe, sort_keys=True),
        victim_changes=json.dumps(info.recipe_changes, sort_keys=True),
        victim_file=str(info.path),
        seed=info.seed,
        victim_seconds=info.wall_seconds,
        victim_ood_l1=diagnostic("diag_ood_l1"),
        victim_id_cosine=diagnostic("diag_id_cosine"),
    )


def _derived_recipe(info: _victim.VictimInfo) -> tuple[dict, dict]:
    """The recipe identity of a victim trained before victims recorded theirs, derived from its recorded flags by
    the stage that trained it: the stage's own defaults stand in for flags that did not exist yet."""
    from stages import train, train_ini  # the stages that write victims know their flags

    derive = {"train": train.recipe_identity, "train-ini": train_ini.recipe_identity}.get(info.provenance.get("stage"))
    if derive is None:
        raise UserError(f"{info.path}: records neither its recipe nor the stage that trained it; retrain it")
    return derive(info.params, info.input_shape[0])


def _pool_name(params: dict) -> str:
    pool = params.get("pool")
    return Path(str(pool)).stem if pool else "-"

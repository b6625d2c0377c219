"""Steal a victim as a thief would: through a budgeted black box, optionally behind a posterior defense, with
KnockoffNets, JBDA, JBDA-TR, DFME or the adaptive (hard-label, query-smoothing) attack (docs/method.md, "Attacks").

Reads victim.pt or victim.h5 and a pool; writes `surrogate.h5`: the surrogate's weights, its per-epoch stealing
accuracy and fidelity on the victim's test split, and the full transfer set (every query and answer). Checkpoints
beside it after querying and after every epoch (`stages/_steal_checkpoint.py`); `--resume` continues from there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

import models
from models.params import UserError, describe
from models.params import parse as parse_params
from stages import _blackbox, _data, _defense, _loop, _options, _steal_checkpoint, _victim
from stages._artifacts import check_memory, prepare_output, save_history, save_state, write_artifact
from stages._options import ATTACK, RECIPE, RUNTIME, VICTIM
from stages.attacks import ATTACKS, Attack
from stages.attacks._thief import SurrogateRecipe, Thief

console = Console(stderr=True)
KNOCKOFF_LR = 0.1  # KnockoffNets' surrogate learning rate
LENET_LR = 0.03  # measured: a LeNet-5 surrogate (no BatchNorm) at 0.1 / momentum 0.9 predicts one class (11.35%)


def run(
    victim: Annotated[Path, typer.Option(
        help="victim.h5, or a deployed victim.pt (TorchScript: only load files you trust).",
        rich_help_panel=VICTIM)] = Path("artifacts/victim.h5"),
    data: Annotated[Optional[str], typer.Option(
        help="The victim's dataset, for its test split [default: the one it was trained on].",
        rich_help_panel=VICTIM)] = None,
    defense: _options.DefenseName = "none",
    defense_param: _options.DefenseParams = None,
    attack: Annotated[str, typer.Option(help=f"Attack: {', '.join(ATTACKS)}.", rich_help_panel=ATTACK)] = "knockoff",
    budget: Annotated[int, typer.Option(min=1, help="Queries allowed (1 image = 1 query).",
                                        rich_help_panel=ATTACK)] = 50_000,
    label: Annotated[Optional[Literal["soft", "hard"]], typer.Option(
        help="What the black box answers: probabilities or top-1 labels [default: the attack's].",
        rich_help_panel=ATTACK)] = None,
    pool: Annotated[Optional[str], typer.Option(
        help="The thief's images, a prepared dataset (.h5) or name: knockoff and adaptive query it, jbda takes its "
             "seeds from it [default: the victim's train split].", rich_help_panel=ATTACK)] = None,
    pool_split: Annotated[Literal["train", "val", "test"], typer.Option(
        help="Split of --pool used.", rich_help_panel=ATTACK)] = "train",
    convert: Annotated[bool, typer.Option(
        help="Resize / convert pool images to the victim's input shape.", rich_help_panel=ATTACK)] = True,
    query_batch: Annotated[int, typer.Option(min=1, help="Images per query call.", rich_help_panel=ATTACK)] = 500,
    attack_param: Annotated[Optional[list[str]], typer.Option(
        "--attack-param", metavar="KEY=VALUE", rich_help_panel=ATTACK,
        help=f"Attack parameter, repeatable. Defaults: {describe(ATTACKS)}.")] = None,
    arch: Annotated[Optional[str], typer.Option(
        help=f"Surrogate architecture: {', '.join(models.MODELS)} [default: the victim's].",
        rich_help_panel=RECIPE)] = None,
    epochs: Annotated[Optional[int], typer.Option(
        min=1, help="Surrogate epochs; jbda: per round; dfme: budget slices [default: the attack's].",
        rich_help_panel=RECIPE)] = None,
    batch_size: _options.BatchSize = 128,
    lr: Annotated[Optional[float], typer.Option(
        min=0.0, help=f"SGD learning rate [default: KnockoffNets' {KNOCKOFF_LR:g}, but {LENET_LR:g} for a lenet5 "
                      "surrogate, which collapses to one class at 0.1 with momentum 0.9].", rich_help_panel=RECIPE)
    ] = None,
    momentum: _options.Momentum = 0.9,
    weight_decay: _options.WeightDecay = 5e-4,
    seed: _options.Seed = 0,
    out: Annotated[Path, typer.Option(help="Output surrogate HDF5.", rich_help_panel=RUNTIME)] = Path("artifacts/surrogate.h5"),
    device: _options.Device = "auto",
    resume: _options.Resume = False,
) -> Path:
    """Steal the victim through a budgeted black box and write the surrogate and the transfer set."""
    params = _resolve(locals())
    started = time.time()
    out = prepare_output(out)
    ckpt = _loop.checkpoint_path(out)
    if resume and not ckpt.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt}")
    target = _load(params)
    arch = params["arch"] = arch or target.info.arch
    params["lr"] = lr if lr is not None else LENET_LR if arch == "lenet5" else KNOCKOFF_LR
    recipe = SurrogateRecipe(epochs=epochs or ATTACKS[attack].DEFAULT_EPOCHS, batch_size=batch_size, lr=params["lr"],
                             momentum=momentum, weight_decay=weight_decay)
    params.update(victim=str(victim), epochs=recipe.epochs, data=str(target.data.path))
    fingerprint = _loop.fingerprint({**params, "input_sha256": target.hashes})
    c, h, _ = target.info.input_shape
    # The transfer set lives in memory while the surrogate trains: float32 images (jbda, dfme) and answers.
    check_memory(budget * 4 * (c * h * h + len(target.info.classes)), f"steal: a transfer set of {budget:,} queries")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        surrogate = models.build_model(arch, len(target.info.classes), c, h, target.info.mean, target.info.std)
    surrogate = surrogate.to(params["device"])
    rng = torch.Generator().manual_seed(seed)
    strategy = ATTACKS[attack](**params["attack_params"])
    with write_artifact(out, "surrogate", "steal", params, target.inputs, seed, started) as f:
        summary = _attack(f, params, target, strategy, surrogate, recipe, rng, ckpt, fingerprint,
                          _steal_checkpoint.read(ckpt, fingerprint, surrogate, rng) if resume else None)
    ckpt.unlink(missing_ok=True)
    _summarise(params, target.info, summary, out, time.time() - started)
    return out


# ------------------------------------------------------------------------------------------------ flags


def _resolve(flags: dict) -> dict:
    """The flags as the run uses and records them (attack and defense parameters with their defaults, the attack's
    label, the device), with every combination the flags alone can refute."""
    if flags["budget"] < 1:
        raise UserError(f"--budget must be at least 1, got {flags['budget']}")
    name = flags["attack"]
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    kind = ATTACKS[name]
    params = dict(flags, attack_params=parse_params(f"attack {name!r}", "--attack-param", kind.PARAMS,
                                                    flags["attack_param"]),
                  defense_params=_defense.parse(flags["defense"], flags["defense_param"]),
                  label=flags["label"] or kind.LABELS[0])
    if params["label"] not in kind.LABELS:
        raise UserError(f"{name} needs --label {' or '.join(kind.LABELS)}")
    if kind.POOL == "none" and flags["pool"] is not None:
        raise UserError(f"{name} is data-free: it takes no --pool")
    if kind.POOL == "required" and flags["pool"] is None:
        raise UserError(f"{name} needs --pool: a prepared dataset or a dataset name")
    if flags["arch"] is not None:
        models.check_arch(flags["arch"])
    params["device"] = _loop.pick_device(flags["device"])
    return params


# ------------------------------------------------------------------------------------------------ load


@dataclass
class _Target:
    """The victim as the thief meets it, the data it is scored on, and the thief's pool."""

    graph: nn.Module  # the victim, undefended (a victim.pt: as deployed)
    info: _victim.VictimInfo
    defended: nn.Module  # what the black box answers with: the victim behind --defense
    data: _data.Dataset  # the victim's dataset: its test split scores the surrogate
    pool: Optional[torch.Tensor]  # uint8, at the victim's input shape
    inputs: list[Path]
    hashes: list[str]  # in the fingerprint: a checkpoint keeps pool indices, not images


def _load(p: dict) -> _Target:
    graph, info = _blackbox.open_victim(p["victim"], p["device"])
    defended = _blackbox.defend(graph, info, p["defense"], p["defense_params"], p["device"])
    needs_train = ATTACKS[p["attack"]].POOL == "seeds" and p["pool"] is None
    data = _data.load(p["data"] or info.dataset_path, splits=("train", "test") if needs_train else ("test",))
    _victim.check_matches(info, data)
    inputs, hashes, images = [p["victim"], data.path], [info.sha256, data.sha256], None
    if p["pool"] is not None:
        pool_data = _data.load(p["pool"], splits=(p["pool_split"],))
        images = pool_data.splits[p["pool_split"]][0]
        if tuple(images.shape[1:]) != tuple(info.input_shape):
            if not p["convert"]:
                raise UserError(f"pool {pool_data.path} holds {list(images.shape[1:])} images but the victim takes "
                                f"{list(info.input_shape)}; drop --no-convert to resize them")
            images = _data.fit_images(images, info.input_shape)
        inputs.append(pool_data.path)
        p["pool"] = str(pool_data.path)
        hashes.append(pool_data.sha256)
    elif needs_train:
        images = data.splits["train"][0]
    if images is not None and len(images) == 0:
        raise UserError(f"the pool ({p['pool'] or 'victim train split'}) holds no images")
    return _Target(graph=graph, info=info, defended=defended, data=data, pool=images, inputs=inputs, hashes=hashes)


# ------------------------------------------------------------------------------------------------ attack


def _attack(f, p: dict, target: _Target, strategy: Attack, surrogate: nn.Module, recipe: SurrogateRecipe,
            rng: torch.Generator, ckpt: Path, fingerprint: str, saved: Optional[_steal_checkpoint.Saved]) -> dict:
    """Run the attack into the open surrogate.h5 `f`: the transfer set as it is answered, the surrogate scored on
    the victim's test split after every epoch; then the summary, as attributes and returned. `saved`: the checkpoint
    resumed from, if any."""
    device, info = p["device"], target.info
    test_x, test_y = target.data.splits["test"]
    test_float = _data.to_float(test_x)
    victim_top1 = _blackbox.predict(target.graph, test_float, device).argmax(1).cpu()
    defended_top1 = _blackbox.predict(target.defended, test_float, device).argmax(1).cpu()
    history: dict[str, list[float]] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
    with progress:
        queries_task = progress.add_task("queries", total=p["budget"], info="")
        epochs_task = progress.add_task("surrogate epochs", total=strategy.planned_epochs(recipe.epochs), info="")
        box = _blackbox.BlackBox(target.defended, p["budget"], p["label"], info.input_shape, len(info.classes), device,
                                 f.create_group("transfer"), ATTACKS[p["attack"]].UINT8_QUERIES,
                                 on_answer=lambda n: progress.advance(queries_task, n))
        if saved is not None:
            box.replay(saved.images, saved.answers)
            history.update(saved.history)
            progress.advance(epochs_task, saved.epoch)
            console.print(f"resumed from {ckpt} after epoch {saved.epoch}, {box.used:,} queries spent")

        def end_epoch(stats: dict[str, float]) -> None:
            was_training = surrogate.training
            predicted = _blackbox.predict(surrogate.eval(), test_float, device).argmax(1).cpu()
            surrogate.train(was_training)
            row = {"stealing_accuracy": float((predicted == test_y).float().mean()),
                   "fidelity": float((predicted == victim_top1).float().mean()), "queries": float(box.used), **stats}
            for key, value in row.items():
                history.setdefault(key, []).append(float(value))
            text = f"stealing {row['stealing_accuracy']:.4f} fidelity {row['fidelity']:.4f}"
            progress.update(epochs_task, advance=1, info=text)
            console.log(f"epoch {len(history['queries'])} queries {box.used:,} "
                        f"loss {stats.get('train_loss', float('nan')):.4g} {text}")

        def checkpoint(state: dict) -> None:
            epoch = len(history.get("queries", []))
            _steal_checkpoint.write(ckpt, fingerprint, epoch, surrogate, rng, history, box, state)

        thief = Thief(surrogate, recipe, len(info.classes), tuple(info.input_shape), rng, device, p["query_batch"],
                      target.pool, end_epoch, checkpoint, saved.attack if saved is not None else {})
        saved = None  # the transfer set is in the box now
        try:
            strategy.run(box, thief)
        except _blackbox.BudgetExhausted:
            pass  # the attack asked past its budget: it is over, and what it learnt so far stands
        if not history:
            end_epoch({})
        box.close()
    return _record(f, p, info, surrogate, history, box.used, victim_top1 == test_y, defended_top1 == test_y)


def _record(f, p: dict, info: _victim.VictimInfo, surrogate: nn.Module, history: dict[str, list[float]], queries: int,
            victim_right: torch.Tensor, defended_right: torch.Tensor) -> dict:
    """The surrogate, its history and the summary into `f`; the summary returned. `victim_right` and
    `defended_right`: where the victim's top-1 on the test split is right, plain and behind the defense."""
    victim_accuracy = float(victim_right.float().mean())
    final, best = history["stealing_accuracy"][-1], max(history["stealing_accuracy"])
    summary = dict(
        stealing_accuracy=final, fidelity=history["fidelity"][-1], max_stealing_accuracy=best,
        max_stealing_epoch=history["stealing_accuracy"].index(best) + 1, victim_accuracy=victim_accuracy,
        defended_accuracy=float(defended_right.float().mean()),
        relative_accuracy=final / victim_accuracy if victim_accuracy else 0.0, queries=queries, budget=p["budget"])
    f.attrs.update(summary)
    f.attrs.update(attack=p["attack"], label=p["label"], defense=p["defense"], arch=p["arch"], dataset=info.dataset,
                   attack_params=json.dumps(p["attack_params"]), defense_params=json.dumps(p["defense_params"]),
                   classes=json.dumps(info.classes), input_shape=list(info.input_shape), mean=info.mean,
                   std=info.std, victim_sha256=info.sha256, baked_defense=info.baked_defense,
                   eval_split="test", eval_images=len(victim_right),
                   max_stealing_note="max over epochs on the test split: peeks at test, not a headline")
    save_state(f.create_group("weights"), surrogate.state_dict())
    save_history(f.create_group("history"), history)
    return summary


# ------------------------------------------------------------------------------------------------ summarise


def _summarise(p: dict, info: _victim.VictimInfo, s: dict, out: Path, seconds: float) -> None:
    defense = (_defense.label(p["defense"], p["defense_params"]) if info.baked_defense == "none"
               else f"{info.baked_defense} (baked into {Path(p['victim']).name})")
    table = Table(title=f"steal: {p['attack']} ({p['label']} labels) against {defense}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("queries", f"{s['queries']:,} / {s['budget']:,}")
    table.add_row("stealing accuracy (final)", f"{s['stealing_accuracy']:.2%}")
    table.add_row("max over epochs (test-peeking)", f"{s['max_stealing_accuracy']:.2%} at epoch {s['max_stealing_epoch']}")
    table.add_row("fidelity (final)", f"{s['fidelity']:.2%}")
    table.add_row("victim benign accuracy", f"{s['victim_accuracy']:.2%}")
    table.add_row("behind the defense", f"{s['defended_accuracy']:.2%}")
    table.add_row("relative accuracy", f"{s['relative_accuracy']:.3f}")
    table.add_row("time", f"{seconds:.1f} s")
    table.add_row("surrogate", f"{out} ({out.stat().st_size / 1e6:.2f} MB)")
    console.print(table)

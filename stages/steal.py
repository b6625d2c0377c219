"""Steal a victim as a thief would: through a budgeted black box, optionally behind a posterior defense, with
KnockoffNets, JBDA, JBDA-TR, DFME or the adaptive (hard-label, query-smoothing) attack, or a thief that adapts to
InI's uninformative answers (confidence-aware knockoff, confidence search, a labelled seed).

Reads victim.pt or victim.h5 and a pool; writes `surrogate.h5`: the surrogate's weights, its per-epoch stealing
accuracy and fidelity on the victim's test split, and the full transfer set (every query and answer). Checkpoints
beside it after querying and after every epoch (`stages/_steal_checkpoint.py`); `--resume` continues from there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import models
from stages import _blackbox, _budget_curve, _data, _defense, _loop, _params, _remote, _steal_checkpoint
from stages._artifacts import UserError, check_memory, prepare_output, save_history, save_state, write_artifact
from stages.attacks import ATTACKS
from stages.attacks._thief import Recipe, Thief

console = Console(stderr=True)
LENET_LR = 0.03  # measured: a LeNet-5 surrogate (no BatchNorm) at 0.1 / momentum 0.9 predicts one class (11.35%)


def run(
    victim: Annotated[Optional[Path], typer.Option(
        help="victim.h5, or a deployed victim.pt (TorchScript: only load files you trust) [default: "
             "artifacts/victim.h5]. With --target: optional, the served model's file, never queried: it scores "
             "fidelity and lets evaluate recompute the row.")] = None,
    target: Annotated[Optional[str], typer.Option(
        help="Steal through a prediction API (`serve`) at this URL instead of a local victim; --budget is cut to "
             "what the key has left.")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="INI_API_KEY", help="The API key for --target (or $INI_API_KEY); never recorded.")] = None,
    attack: Annotated[str, typer.Option(help=f"Attack: {', '.join(ATTACKS)}.")] = "knockoff",
    budget: Annotated[int, typer.Option(min=1, help="Queries allowed (1 image = 1 query).")] = 50_000,
    label: Annotated[Optional[Literal["soft", "hard"]], typer.Option(
        help="What the black box answers: probabilities or top-1 labels (default: the attack's).")] = None,
    pool: Annotated[Optional[str], typer.Option(
        help="The thief's images, a prepared dataset (.h5) or name: knockoff and adaptive query it, jbda takes its "
             "seeds from it (default: the victim's train split); seeded takes its labelled images from the "
             "victim's train split, whatever the pool.")] = None,
    pool_split: Annotated[Literal["train", "val", "test"], typer.Option(help="Split of --pool used.")] = "train",
    convert: Annotated[bool, typer.Option(help="Resize / convert pool images to the victim's input shape.")] = True,
    arch: Annotated[Optional[str], typer.Option(
        help=f"Surrogate architecture: {', '.join(models.MODELS)} (default: the victim's).")] = None,
    epochs: Annotated[Optional[int], typer.Option(
        min=1, help="Surrogate epochs; jbda, confidence-search: per round; knockoff-confident with near=0: per "
                    "phase; dfme: budget slices (default: the attack's).")] = None,
    batch_size: _loop.BatchSize = 128,
    lr: Annotated[Optional[float], typer.Option(
        min=0.0, help="SGD learning rate (default: KnockoffNets' 0.1, but 0.03 for a lenet5 surrogate, which "
                      "collapses to one class at 0.1 with momentum 0.9).")] = None,
    momentum: _loop.Momentum = 0.9,
    weight_decay: _loop.WeightDecay = 5e-4,
    query_batch: Annotated[int, typer.Option(min=1, help="Images per query call.")] = 500,
    budget_curve: Annotated[int, typer.Option(
        min=0, max=12, help="knockoff, adaptive: also train surrogates on the first 1/2, 1/4, ... 1/2^K of the "
                            "transfer set (K of them), for stealing accuracy against queries spent.")] = 0,
    attack_param: Annotated[Optional[list[str]], typer.Option(
        "--attack-param", metavar="KEY=VALUE",
        help=f"Attack parameter, repeatable. Defaults: {_params.describe(ATTACKS, details=True)}.")] = None,
    defense: _defense.DefenseName = "none",
    defense_param: _defense.DefenseParams = None,
    data: Annotated[Optional[str], typer.Option(
        help="The victim's dataset, for its test split (default: the one it was trained on).")] = None,
    out: Annotated[Path, typer.Option(help="Output surrogate HDF5.")] = Path("artifacts/surrogate.h5"),
    seed: _loop.Seed = 0,
    device: _loop.Device = "auto",
    resume: _loop.Resume = False,
) -> Path:
    """Steal the victim through a budgeted black box and write the surrogate and the transfer set."""
    started = time.time()
    params = dict(locals())
    params.pop("started")
    params.pop("api_key")
    if budget < 1:
        raise UserError(f"--budget must be at least 1, got {budget}")
    if attack not in ATTACKS:
        raise UserError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    kind = ATTACKS[attack]
    attack_params = _params.parse(f"attack {attack!r}", "--attack-param", kind.PARAMS, attack_param)
    defense_params = _defense.parse(defense, defense_param)
    label = label or kind.LABELS[0]
    if label not in kind.LABELS:
        raise UserError(f"{attack} needs --label {' or '.join(kind.LABELS)}")
    if kind.POOL == "none" and pool is not None:
        raise UserError(f"{attack} is data-free: it takes no --pool")
    if kind.POOL == "required" and pool is None:
        raise UserError(f"{attack} needs --pool: a prepared dataset or a dataset name")
    if budget_curve and kind.POOL != "required":
        raise UserError(f"--budget-curve: {attack} records stealing accuracy per round or budget slice already")
    if arch is not None and arch not in models.MODELS:
        raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(models.MODELS)}")
    out = prepare_output(out)
    ckpt = _loop.checkpoint_path(out)
    if resume and not ckpt.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt}")
    device = _loop.pick_device(device)

    if target is None:
        victim = victim or Path("artifacts/victim.h5")
        graph, info = _blackbox.open_victim(victim, device)
        answering = _blackbox.defend(graph, info, defense, defense_params, device)
    else:  # the API answers; a local copy of the served model, if given, only scores
        if defense != "none":
            raise UserError("--defense with --target: the server applies its own defense; serve the model with it")
        answering, info, budget = _remote.open_target(target, api_key, budget)
        graph = None
        if victim is not None:
            graph, local = _blackbox.open_victim(victim, device)
            if local.sha256 != info.sha256:
                raise UserError(f"--victim {victim} is not the model {target} serves (sha256 differs)")
            info.dataset_path = local.dataset_path
    labelled = getattr(kind, "LABELLED", False)  # the thief holds a few labelled images of the victim's train split
    needs_train = kind.POOL == "seeds" and pool is None or labelled
    victim_data = _data.load(data or info.dataset_path, splits=("train", "test") if needs_train else ("test",))
    if (victim_data.name, tuple(victim_data.shape), victim_data.num_classes) != (info.dataset, tuple(info.input_shape),
                                                                              len(info.classes)):
        raise UserError(f"victim {victim} was trained on {info.dataset} {list(info.input_shape)} "
                        f"({len(info.classes)} classes), not on {victim_data.path} ({victim_data.name} "
                        f"{list(victim_data.shape)})")
    inputs = [path for path in (victim, victim_data.path) if path is not None]
    hashes = [info.sha256, victim_data.sha256]  # in the fingerprint: a checkpoint keeps pool indices, not images
    images = None
    if pool is not None:
        pool_data = _data.load(pool, splits=(pool_split,))
        images = pool_data.splits[pool_split][0]
        if tuple(images.shape[1:]) != tuple(info.input_shape):
            if not convert:
                raise UserError(f"pool {pool_data.path} holds {list(images.shape[1:])} images but the victim takes "
                                f"{list(info.input_shape)}; drop --no-convert to resize them")
            images = _data.fit_images(images, info.input_shape)
        inputs.append(pool_data.path)
        params["pool"] = str(pool_data.path)
        hashes.append(pool_data.sha256)
    elif needs_train:
        images = victim_data.splits["train"][0]
    if images is not None and len(images) == 0:
        raise UserError(f"the pool ({pool or 'victim train split'}) holds no images")
    if labelled and len(victim_data.splits["train"][0]) == 0:
        raise UserError(f"{attack} draws labelled images from the victim's train split; {victim_data.path} has none")

    arch = arch or info.arch
    if lr is None:
        lr = LENET_LR if arch == "lenet5" else 0.1
    recipe = Recipe(epochs or kind.DEFAULT_EPOCHS, batch_size, lr, momentum, weight_decay)
    runner = kind(**attack_params)
    params.update(victim=str(victim) if victim is not None else None, lr=lr, attack_params=attack_params, defense_params=defense_params, label=label, arch=arch,
                  epochs=recipe.epochs, data=str(victim_data.path), device=device)
    fingerprint = _loop.fingerprint({**params, "input_sha256": hashes})
    c, h, _ = info.input_shape
    # The transfer set lives in memory while the surrogate trains: float32 images (jbda, dfme) and answers.
    check_memory(budget * 4 * (c * h * h + len(info.classes)), f"steal: a transfer set of {budget:,} queries")
    def build_surrogate() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return models.build_model(arch, len(info.classes), c, h, info.mean, info.std).to(device)

    surrogate = build_surrogate()
    generator = torch.Generator().manual_seed(seed)
    saved = _steal_checkpoint.read(ckpt, fingerprint, surrogate, generator) if resume else None

    test_x, test_y = victim_data.splits["test"]
    test_float = _data.to_float(test_x)
    victim_top1 = defended_top1 = None  # over HTTP without the served file: unknown, asking would spend budget
    if graph is not None:
        victim_top1 = _blackbox.predict(graph, test_float, device).argmax(1).cpu()
        defended_top1 = victim_top1 if target else _blackbox.predict(answering, test_float, device).argmax(1).cpu()
    victim_accuracy = float((victim_top1 == test_y).float().mean()) if graph is not None else float("nan")
    defended_accuracy = float((defended_top1 == test_y).float().mean()) if graph is not None else float("nan")

    history: dict[str, list[float]] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
    with write_artifact(out, "surrogate", "steal", params, inputs, seed, started) as f, progress:
        queries_task = progress.add_task("queries", total=budget, info="")
        epochs_task = progress.add_task("surrogate epochs", total=runner.planned_epochs(recipe.epochs), info="")
        box = _blackbox.BlackBox(answering, budget, label, info.input_shape, len(info.classes), device,
                                 f.create_group("transfer"), kind.UINT8_QUERIES,
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
                   "fidelity": float((predicted == victim_top1).float().mean()) if graph is not None else float("nan"),
                   "queries": float(box.used), **stats}
            for key, value in row.items():
                history.setdefault(key, []).append(float(value))
            text = f"stealing {row['stealing_accuracy']:.4f} fidelity {row['fidelity']:.4f}"
            progress.update(epochs_task, advance=1, info=text)
            console.log(f"epoch {len(history['queries'])} queries {box.used:,} loss {stats.get('train_loss', float('nan')):.4g} {text}")

        def checkpoint(state: dict) -> None:
            epoch = len(history.get("queries", []))
            _steal_checkpoint.write(ckpt, fingerprint, epoch, surrogate, generator, history, box, state)

        thief = Thief(surrogate, recipe, len(info.classes), tuple(info.input_shape), generator, device, query_batch,
                      images, end_epoch, checkpoint, saved.attack if saved is not None else {},
                      labelled=victim_data.splits["train"] if labelled else None)
        saved = None  # the transfer set is in the box now
        try:
            runner.run(box, thief)
        except _blackbox.BudgetExhausted:
            pass  # the attack asked past its budget: it is over, and what it learnt so far stands
        if not history:
            end_epoch({})
        box.close()
        if budget_curve:
            curve = _budget_curve.measure(f["transfer/images"], f["transfer/answers"], label, attack,
                                          _budget_curve.prefixes(box.used, budget_curve),
                                          build_surrogate, recipe, len(info.classes), info.input_shape, seed, device,
                                          test_float, test_y, console.log)
            save_history(f.create_group("curve"), {"queries": curve["queries"] + [float(box.used)],
                                                   "stealing_accuracy": curve["stealing_accuracy"]
                                                   + [history["stealing_accuracy"][-1]]})
        final, best = history["stealing_accuracy"][-1], max(history["stealing_accuracy"])
        summary = dict(
            stealing_accuracy=final, fidelity=history["fidelity"][-1], max_stealing_accuracy=best,
            max_stealing_epoch=history["stealing_accuracy"].index(best) + 1, victim_accuracy=victim_accuracy,
            defended_accuracy=defended_accuracy, relative_accuracy=final / victim_accuracy if victim_accuracy else 0.0,
            queries=box.used, budget=budget)
        f.attrs.update(summary)
        f.attrs.update(attack=attack, label=label, defense=defense, arch=arch, dataset=info.dataset,
                       attack_params=json.dumps(attack_params), defense_params=json.dumps(defense_params),
                       classes=json.dumps(info.classes), input_shape=list(info.input_shape), mean=info.mean,
                       std=info.std, victim_sha256=info.sha256, baked_defense=info.baked_defense,
                       eval_split="test", eval_images=len(test_y),
                       max_stealing_note="max over epochs on the test split: peeks at test, not a headline")
        save_state(f.create_group("weights"), surrogate.state_dict())
        save_history(f.create_group("history"), history)
    ckpt.unlink(missing_ok=True)
    shown = defense if info.baked_defense == "none" else f"{info.baked_defense} (baked into {Path(str(victim)).name})"
    shown = f"the API at {target}" if target else shown
    _summarise(attack, label, shown, defense_params, summary, out, time.time() - started)
    return out


def _summarise(attack: str, label: str, defense: str, defense_params: dict, s: dict, out: Path, seconds: float) -> None:
    table = Table(title=f"steal: {attack} ({label} labels) against {defense}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    if defense_params:
        table.add_row("defense parameters", " ".join(f"{k}={v:g}" for k, v in defense_params.items()))
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

"""Steal a victim as a thief would: through a budgeted black box, optionally behind a posterior defense, with
KnockoffNets, JBDA, JBDA-TR, DFME or the adaptive (hard-label, query-smoothing) attack, or a thief that adapts to
InI's uninformative answers (confidence-aware knockoff, confidence search, a labelled seed) (docs/method.md,
"Attacks"). The black box is a local victim file, or a prediction API (`serve`) reached over HTTP with --target.

Reads victim.pt or victim.h5 and a pool; writes `surrogate.h5`: the surrogate's weights, its per-epoch stealing
accuracy and fidelity on the victim's test split, and the full transfer set (every query and answer). Checkpoints
beside it after querying and after every epoch (`stages/attacks/checkpoint.py`); `--resume` continues from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

import models
from models.params import UserError, describe
from models.params import parse as parse_params
from stages.attacks import ATTACKS, Attack
from stages.attacks import blackbox as _blackbox
from stages.attacks import checkpoint as _steal_checkpoint
from stages.attacks._thief import SurrogateRecipe, Thief
from stages.core import options as _options
from stages.core.artifacts import check_memory, prepare_output, save_history, save_state, write_artifact
from stages.core.options import ATTACK, RECIPE, RUNTIME, VICTIM
from stages.data import prepared as _data
from stages.deploy import defense as _defense
from stages.evaluation import budget_curve as _budget_curve
from stages.serving import client as _remote
from stages.training import loop as _loop
from stages.training import victim as _victim

console = Console(stderr=True)
KNOCKOFF_LR = 0.1  # KnockoffNets' surrogate learning rate
LENET_LR = 0.03  # measured: a LeNet-5 surrogate (no BatchNorm) at 0.1 / momentum 0.9 predicts one class (11.35%)
ADAM_LR = 1e-3  # Adam's usual rate, and the independent KnockoffNets' (the Adversarial Robustness Toolbox's)
SGD_DECAY = 5e-4  # KnockoffNets' weight decay


def run(
    victim: Annotated[
        Optional[Path],
        typer.Option(
            help="victim.h5, or a deployed victim.pt (TorchScript: only load files you trust) [default: "
            "artifacts/victim.h5]. With --target: optional, the served model's file, never queried: it scores "
            "fidelity and lets evaluate recompute the row.",
            rich_help_panel=VICTIM,
        ),
    ] = None,
    target: Annotated[
        Optional[str],
        typer.Option(
            help="Steal through a prediction API (`serve`) at this URL instead of a local victim; --budget is cut to "
            "what the key has left.",
            rich_help_panel=VICTIM,
        ),
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            envvar="INI_API_KEY",
            help="The API key for --target (or $INI_API_KEY); never recorded. With --target-move sybil: "
            "comma-separated keys.",
            rich_help_panel=VICTIM,
        ),
    ] = None,
    target_move: Annotated[
        Optional[list[str]],
        typer.Option(
            help="A monitor-aware thief's move through --target (repeatable): sybil=PER_KEY (spread over the keys, "
            "each answered at most PER_KEY images), mix=SHARE (that share of each request is benign-looking filler, "
            "counted against the budget, not trained on), paced=RATE (images per second).",
            rich_help_panel=VICTIM,
        ),
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option(
            help="The victim's dataset, for its test split [default: the one it was trained on].",
            rich_help_panel=VICTIM,
        ),
    ] = None,
    defense: _options.DefenseName = "none",
    defense_param: _options.DefenseParams = None,
    watermark_key: _options.WatermarkKey = None,
    attack: Annotated[str, typer.Option(help=f"Attack: {', '.join(ATTACKS)}.", rich_help_panel=ATTACK)] = "knockoff",
    budget: Annotated[
        int, typer.Option(min=1, help="Queries allowed (1 image = 1 query).", rich_help_panel=ATTACK)
    ] = 50_000,
    label: Annotated[
        Optional[Literal["soft", "hard"]],
        typer.Option(
            help="What the black box answers: probabilities or top-1 labels [default: the attack's].",
            rich_help_panel=ATTACK,
        ),
    ] = None,
    pool: Annotated[
        Optional[str],
        typer.Option(
            help="The thief's images, a prepared dataset (.h5) or name: knockoff and adaptive query it, jbda takes its "
            "seeds from it [default: the victim's train split]; seeded takes its labelled images from the "
            "victim's train split, whatever the pool.",
            rich_help_panel=ATTACK,
        ),
    ] = None,
    pool_split: Annotated[
        Literal["train", "val", "test"], typer.Option(help="Split of --pool used.", rich_help_panel=ATTACK)
    ] = "train",
    convert: Annotated[
        bool, typer.Option(help="Resize / convert pool images to the victim's input shape.", rich_help_panel=ATTACK)
    ] = True,
    query_batch: Annotated[int, typer.Option(min=1, help="Images per query call.", rich_help_panel=ATTACK)] = 500,
    attack_param: Annotated[
        Optional[list[str]],
        typer.Option(
            "--attack-param",
            metavar="KEY=VALUE",
            rich_help_panel=ATTACK,
            help=f"Attack parameter, repeatable. Defaults: {describe(ATTACKS, details=True)}.",
        ),
    ] = None,
    budget_curve: Annotated[
        int,
        typer.Option(
            min=0,
            max=12,
            help="knockoff, adaptive: also train surrogates on the first 1/2, 1/4, ... 1/2^K of the "
            "transfer set (K of them), for stealing accuracy against queries spent.",
            rich_help_panel=ATTACK,
        ),
    ] = 0,
    arch: Annotated[
        Optional[str],
        typer.Option(
            help=f"Surrogate architecture: {', '.join(models.MODELS)} [default: the victim's].", rich_help_panel=RECIPE
        ),
    ] = None,
    epochs: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Surrogate epochs; jbda, confidence-search: per round; knockoff-confident with near=0: per "
            "phase; dfme: budget slices [default: the attack's].",
            rich_help_panel=RECIPE,
        ),
    ] = None,
    batch_size: _options.BatchSize = 128,
    optimizer: Annotated[
        Optional[Literal["sgd", "adam"]],
        typer.Option(
            help="The surrogate's optimizer: SGD with momentum (the KnockoffNets paper's) or Adam [default: the "
            "attack's: adam for the pool thieves (knockoff, knockoff-confident, seeded, adaptive), sgd for the "
            "others].",
            rich_help_panel=RECIPE,
        ),
    ] = None,
    schedule: Annotated[
        Optional[Literal["cosine", "constant"]],
        typer.Option(
            help="The learning rate over the surrogate's epochs: cosine to 0 (the KnockoffNets paper's) or constant "
            "[default: the attack's: constant with adam, cosine with sgd].",
            rich_help_panel=RECIPE,
        ),
    ] = None,
    lr: Annotated[
        Optional[float],
        typer.Option(
            min=0.0,
            help=f"Learning rate [default: SGD: KnockoffNets' {KNOCKOFF_LR:g}, but {LENET_LR:g} for a lenet5 "
            f"surrogate, which collapses to one class at 0.1 with momentum 0.9; Adam: {ADAM_LR:g}].",
            rich_help_panel=RECIPE,
        ),
    ] = None,
    momentum: _options.Momentum = 0.9,
    weight_decay: Annotated[
        Optional[float],
        typer.Option(
            min=0.0,
            help="Weight decay [default: SGD: KnockoffNets' 5e-4; Adam: 0, as the independent KnockoffNets trains "
            "(with Adam the decay is normalised like the gradient, and it flattens a surrogate learning "
            "from near-uniform answers)].",
            rich_help_panel=RECIPE,
        ),
    ] = None,
    seed: _options.Seed = 0,
    out: Annotated[Path, typer.Option(help="Output surrogate HDF5.", rich_help_panel=RUNTIME)] = Path(
        "artifacts/surrogate.h5"
    ),
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
    target, params = _load(params, api_key, watermark_key)
    arch = arch or target.info.arch
    recipe, params = _surrogate_recipe(dataclasses.replace(params, arch=arch))
    params = dataclasses.replace(
        params,
        victim=None if target.file is None else str(target.file),
        epochs=recipe.epochs,
        data=str(target.data.path),
    )
    fingerprint = _loop.fingerprint({**dataclasses.asdict(params), "input_sha256": target.hashes})
    c, h, _ = target.info.input_shape
    # The transfer set lives in memory while the surrogate trains: float32 images (jbda, dfme) and answers.
    check_memory(budget * 4 * (c * h * h + len(target.info.classes)), f"steal: a transfer set of {budget:,} queries")

    def build_surrogate() -> nn.Module:  # the thief's network as initialised (the budget curve trains fresh ones)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = models.build_model(arch, len(target.info.classes), c, h, target.info.mean, target.info.std)
        return net.to(params.device)

    surrogate = build_surrogate()
    rng = torch.Generator().manual_seed(seed)
    strategy = ATTACKS[attack](**params.attack_params)
    with write_artifact(out, "surrogate", "steal", dataclasses.asdict(params), target.inputs, seed, started) as f:
        summary = _attack(
            f,
            params,
            target,
            strategy=strategy,
            surrogate=surrogate,
            recipe=recipe,
            rng=rng,
            ckpt=ckpt,
            fingerprint=fingerprint,
            saved=_steal_checkpoint.read(ckpt, fingerprint, surrogate, rng) if resume else None,
        )
        if budget_curve:
            _record_curve(f, params, target, build_surrogate, recipe)
    ckpt.unlink(missing_ok=True)
    _summarise(params, target, summary, out, time.time() - started)
    return out


# ------------------------------------------------------------------------------------------------ flags


# the resolved flags with the attack's and the defense's parameters; the API and watermark keys stay out
Flags = _options.flags_of(run, "attack_params", "defense_params", secrets=("api_key", "watermark_key"))


def _resolve(flags: dict) -> "Flags":
    """The flags as the run uses and records them (attack and defense parameters with their defaults, the attack's
    label, the device), with every combination the flags alone can refute. The API key is used, never recorded."""
    if flags["budget"] < 1:
        raise UserError(f"--budget must be at least 1, got {flags['budget']}")
    name = flags["attack"]
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    kind = ATTACKS[name]
    label = flags["label"] or kind.LABELS[0]
    if label not in kind.LABELS:
        raise UserError(f"{name} needs --label {' or '.join(kind.LABELS)}")
    if kind.POOL == "none" and flags["pool"] is not None:
        raise UserError(f"{name} is data-free: it takes no --pool")
    if kind.POOL == "required" and flags["pool"] is None:
        raise UserError(f"{name} needs --pool: a prepared dataset or a dataset name")
    if flags["budget_curve"] and kind.POOL != "required":
        raise UserError(f"--budget-curve: {name} records stealing accuracy per round or budget slice already")
    if flags["target"] is None and flags["target_move"]:
        raise UserError("--target-move needs --target: the moves are a thief's ways with a monitored API")
    if flags["target"] is not None and flags["defense"] != "none":
        raise UserError("--defense with --target: the server applies its own defense; serve the model with it")
    if flags["arch"] is not None:
        models.check_arch(flags["arch"])
    if flags["watermark_key"] is not None and flags["defense"] != "watermark":
        raise UserError("--watermark-key is the secret of --defense watermark")
    recorded = {f.name for f in dataclasses.fields(Flags)}  # the keys are used, never recorded
    return Flags(
        **{
            **{k: v for k, v in flags.items() if k in recorded},
            "attack_params": parse_params(f"attack {name!r}", "--attack-param", kind.PARAMS, flags["attack_param"]),
            "defense_params": _defense.parse(flags["defense"], flags["defense_param"]),
            "label": label,
            "device": _loop.pick_device(flags["device"]),
        }
    )


def _surrogate_recipe(p: "Flags") -> tuple[SurrogateRecipe, "Flags"]:
    """The thief's training recipe, each flag not given resolved from the attack's optimizer and schedule and that
    optimizer's rate and decay; and the flags with those resolved values, as they are recorded."""
    kind = ATTACKS[p.attack]
    optimizer = p.optimizer or kind.OPTIMIZER
    adam = optimizer == "adam"
    p = dataclasses.replace(
        p,
        optimizer=optimizer,
        schedule=p.schedule or kind.SCHEDULE,
        lr=p.lr if p.lr is not None else ADAM_LR if adam else LENET_LR if p.arch == "lenet5" else KNOCKOFF_LR,
        weight_decay=p.weight_decay if p.weight_decay is not None else 0.0 if adam else SGD_DECAY,
    )
    recipe = SurrogateRecipe(
        epochs=p.epochs or kind.DEFAULT_EPOCHS,
        batch_size=p.batch_size,
        lr=p.lr,
        momentum=p.momentum,
        weight_decay=p.weight_decay,
        optimizer=p.optimizer,
        schedule=p.schedule,
    )
    return recipe, p


# ------------------------------------------------------------------------------------------------ load


@dataclass
class _Target:
    """The victim as the thief meets it, the data it is scored on, and the thief's pool."""

    graph: Optional[nn.Module]  # the victim, undefended (a victim.pt: as deployed); over HTTP the served file, if given
    info: _victim.VictimInfo
    defended: nn.Module  # what the black box answers with: the victim behind --defense, or the API
    file: Optional[Path]  # the victim's file (None over HTTP without one)
    data: _data.Dataset  # the victim's dataset: its test split scores the surrogate
    pool: Optional[torch.Tensor]  # uint8, at the victim's input shape
    labelled: bool  # the attack holds a few labelled images of the victim's train split
    inputs: list[Path]
    hashes: list[str]  # in the fingerprint: a checkpoint keeps pool indices, not images


def _load(p: "Flags", api_key: Optional[str], key_file: Optional[Path] = None) -> tuple[_Target, "Flags"]:
    """The victim (a file, or the API), its dataset and the pool; and the flags with what loading resolved: the pool's
    path, the budget the key has left, the moves through the API."""
    file = p.victim
    if p.target is None:
        file = file or Path("artifacts/victim.h5")
        graph, info = _blackbox.open_victim(file, p.device)
        defended = _blackbox.defend(graph, info, p.defense, p.defense_params, p.device, key_file)
    else:  # the API answers; a local copy of the served model, if given, only scores
        moves = _remote.parse_moves(p.target_move)
        defended, info, budget = _remote.open_target(p.target, api_key, p.budget, moves)
        p = dataclasses.replace(p, budget=budget, target_move={**moves.describe(), "keys": len(defended.keys)})
        graph = None
        if file is not None:
            graph, local = _blackbox.open_victim(file, p.device)
            if local.sha256 != info.sha256:
                raise UserError(f"--victim {file} is not the model {p.target} serves (sha256 differs)")
            info.dataset_path = local.dataset_path
    kind = ATTACKS[p.attack]
    needs_train = kind.POOL == "seeds" and p.pool is None or kind.LABELLED
    data = _data.load(p.data or info.dataset_path, splits=("train", "test") if needs_train else ("test",))
    _victim.check_matches(info, data)
    inputs = [path for path in (file, data.path) if path is not None]
    hashes, images = [info.sha256, data.sha256], None
    if p.pool is not None:
        pool_data = _data.load(p.pool, splits=(p.pool_split,))
        images = pool_data.splits[p.pool_split][0]
        if tuple(images.shape[1:]) != tuple(info.input_shape):
            if not p.convert:
                raise UserError(
                    f"pool {pool_data.path} holds {list(images.shape[1:])} images but the victim takes "
                    f"{list(info.input_shape)}; drop --no-convert to resize them"
                )
            images = _data.fit_images(images, info.input_shape)
        inputs.append(pool_data.path)
        p = dataclasses.replace(p, pool=str(pool_data.path))
        hashes.append(pool_data.sha256)
    elif needs_train:
        images = data.splits["train"][0]
    if images is not None and len(images) == 0:
        raise UserError(f"the pool ({p.pool or 'victim train split'}) holds no images")
    if kind.LABELLED and len(data.splits["train"][0]) == 0:
        raise UserError(f"{p.attack} draws labelled images from the victim's train split; {data.path} has none")
    target = _Target(
        graph=graph,
        info=info,
        defended=defended,
        file=file,
        data=data,
        pool=images,
        labelled=kind.LABELLED,
        inputs=inputs,
        hashes=hashes,
    )
    return target, p


# ------------------------------------------------------------------------------------------------ attack


def _scoring(
    p: "Flags", target: _Target
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The victim's test split as the surrogate is scored on it: images, labels, and the victim's top-1 plain and
    behind the defense (None over HTTP without the served file: unknown, and asking would spend budget)."""
    test_x, test_y = target.data.splits["test"]
    test_float = _data.to_float(test_x)
    if target.graph is None:
        return test_float, test_y, None, None
    victim_top1 = _blackbox.predict(target.graph, test_float, p.device).argmax(1).cpu()
    if p.target:
        return test_float, test_y, victim_top1, victim_top1
    return test_float, test_y, victim_top1, _blackbox.predict(target.defended, test_float, p.device).argmax(1).cpu()


def _attack(
    f,
    p: "Flags",
    target: _Target,
    *,
    strategy: Attack,
    surrogate: nn.Module,
    recipe: SurrogateRecipe,
    rng: torch.Generator,
    ckpt: Path,
    fingerprint: str,
    saved: Optional[_steal_checkpoint.Saved],
) -> dict:
    """Run the attack into the open surrogate.h5 `f`: the transfer set as it is answered, the surrogate scored on
    the victim's test split after every epoch; then the summary, as attributes and returned. `saved`: the checkpoint
    resumed from, if any."""
    device, info = p.device, target.info
    test_float, test_y, victim_top1, defended_top1 = _scoring(p, target)
    history: dict[str, list[float]] = {}
    progress = _loop.progress_bar(console)
    with progress:
        queries_task = progress.add_task("queries", total=p.budget, info="")
        epochs_task = progress.add_task("surrogate epochs", total=strategy.planned_epochs(recipe.epochs), info="")
        box = _blackbox.BlackBox(
            target.defended,
            budget=p.budget,
            label=p.label,
            input_shape=info.input_shape,
            num_classes=len(info.classes),
            device=device,
            transfer=f.create_group("transfer"),
            exact_uint8=ATTACKS[p.attack].UINT8_QUERIES,
            on_answer=lambda n: progress.advance(queries_task, n),
        )
        if saved is not None:
            box.replay(saved.images, saved.answers)
            history.update(saved.history)
            progress.advance(epochs_task, saved.epoch)
            console.print(f"resumed from {ckpt} after epoch {saved.epoch}, {box.used:,} queries spent")

        def end_epoch(stats: dict[str, float]) -> None:
            was_training = surrogate.training
            predicted = _blackbox.predict(surrogate.eval(), test_float, device).argmax(1).cpu()
            surrogate.train(was_training)
            row = {
                "stealing_accuracy": float((predicted == test_y).float().mean()),
                "fidelity": math.nan if victim_top1 is None else float((predicted == victim_top1).float().mean()),
                "queries": float(box.used),
                **stats,
            }
            for key, value in row.items():
                history.setdefault(key, []).append(float(value))
            text = f"stealing {row['stealing_accuracy']:.4f} fidelity {row['fidelity']:.4f}"
            progress.update(epochs_task, advance=1, info=text)
            console.log(
                f"epoch {len(history['queries'])} queries {box.used:,} "
                f"loss {stats.get('train_loss', float('nan')):.4g} {text}"
            )

        def checkpoint(state: dict) -> None:
            epoch = len(history.get("queries", []))
            _steal_checkpoint.write(
                ckpt,
                fingerprint=fingerprint,
                epoch=epoch,
                surrogate=surrogate,
                rng=rng,
                history=history,
                box=box,
                attack=state,
            )

        thief = Thief(
            surrogate,
            recipe=recipe,
            num_classes=len(info.classes),
            input_shape=tuple(info.input_shape),
            rng=rng,
            device=device,
            query_batch=p.query_batch,
            pool=target.pool,
            end_epoch=end_epoch,
            checkpoint=checkpoint,
            resumed=saved.attack if saved is not None else {},
            labelled=target.data.splits["train"] if target.labelled else None,
        )
        saved = None  # the transfer set is in the box now
        try:
            strategy.run(box, thief)
        except _blackbox.BudgetExhausted:
            pass  # the attack asked past its budget: it is over, and what it learnt so far stands
        if not history:
            end_epoch({})
        box.close()
    right = (None, None) if victim_top1 is None else (victim_top1 == test_y, defended_top1 == test_y)
    return _record(f, p, info, surrogate, history, box.used, *right, eval_images=len(test_y))


def _record(
    f,
    p: "Flags",
    info: _victim.VictimInfo,
    surrogate: nn.Module,
    history: dict[str, list[float]],
    queries: int,
    victim_right: Optional[torch.Tensor],
    defended_right: Optional[torch.Tensor],
    eval_images: int,
) -> dict:
    """The surrogate, its history and the summary into `f`; the summary returned. `victim_right` and
    `defended_right`: where the victim's top-1 on the test split is right, plain and behind the defense (None over
    HTTP without the served file: then unknown, NaN)."""
    victim_accuracy = math.nan if victim_right is None else float(victim_right.float().mean())
    final, best = history["stealing_accuracy"][-1], max(history["stealing_accuracy"])
    summary = dict(
        stealing_accuracy=final,
        fidelity=history["fidelity"][-1],
        max_stealing_accuracy=best,
        max_stealing_epoch=history["stealing_accuracy"].index(best) + 1,
        victim_accuracy=victim_accuracy,
        defended_accuracy=math.nan if defended_right is None else float(defended_right.float().mean()),
        relative_accuracy=final / victim_accuracy if victim_accuracy else 0.0,
        queries=queries,
        budget=p.budget,
    )
    f.attrs.update(summary)
    f.attrs.update(
        attack=p.attack,
        label=p.label,
        defense=p.defense,
        arch=p.arch,
        dataset=info.dataset,
        attack_params=json.dumps(p.attack_params),
        defense_params=json.dumps(p.defense_params),
        classes=json.dumps(info.classes),
        input_shape=list(info.input_shape),
        mean=info.mean,
        std=info.std,
        victim_sha256=info.sha256,
        baked_defense=info.baked_defense,
        eval_split="test",
        eval_images=eval_images,
        max_stealing_note="max over epochs on the test split: peeks at test, not a headline",
    )
    save_state(f.create_group("weights"), surrogate.state_dict())
    save_history(f.create_group("history"), history)
    return summary


def _record_curve(f, p: "Flags", target: _Target, build: Callable[[], nn.Module], recipe: SurrogateRecipe) -> None:
    """Group `curve`: stealing accuracy against queries spent, from fresh surrogates trained on prefixes of the
    transfer set (the attack's own surrogate is the last point)."""
    test_x, test_y = target.data.splits["test"]
    used = int(f.attrs["queries"])
    curve = _budget_curve.measure(
        f["transfer/images"],
        f["transfer/answers"],
        label=p.label,
        attack=p.attack,
        sizes=_budget_curve.prefixes(used, p.budget_curve),
        build=build,
        recipe=recipe,
        num_classes=len(target.info.classes),
        input_shape=target.info.input_shape,
        seed=p.seed,
        device=p.device,
        test_x=_data.to_float(test_x),
        test_y=test_y,
        log=console.log,
    )
    save_history(
        f.create_group("curve"),
        {
            "queries": curve["queries"] + [float(used)],
            "stealing_accuracy": curve["stealing_accuracy"] + [float(f.attrs["stealing_accuracy"])],
        },
    )


# ------------------------------------------------------------------------------------------------ summarise


def _summarise(p: "Flags", target: _Target, s: dict, out: Path, seconds: float) -> None:
    info = target.info
    defense = (
        _defense.label(p.defense, p.defense_params)
        if info.baked_defense == "none"
        else f"{info.baked_defense} (baked into {Path(str(p.victim)).name})"
    )
    defense = f"the API at {p.target}" if p.target else defense
    table = Table(title=f"steal: {p.attack} ({p.label} labels) against {defense}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("queries", f"{s['queries']:,} / {s['budget']:,}")
    table.add_row("stealing accuracy (final)", f"{s['stealing_accuracy']:.2%}")
    table.add_row(
        "max over epochs (test-peeking)", f"{s['max_stealing_accuracy']:.2%} at epoch {s['max_stealing_epoch']}"
    )
    table.add_row("fidelity (final)", f"{s['fidelity']:.2%}")
    table.add_row("victim benign accuracy", f"{s['victim_accuracy']:.2%}")
    table.add_row("behind the defense", f"{s['defended_accuracy']:.2%}")
    table.add_row("relative accuracy", f"{s['relative_accuracy']:.3f}")
    table.add_row("time", f"{seconds:.1f} s")
    table.add_row("surrogate", f"{out} ({out.stat().st_size / 1e6:.2f} MB)")
    console.print(table)

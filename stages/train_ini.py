"""Train a victim with InI, Isolation and Induction (Guo et al., ACM MM 2023, arXiv 2308.00958): write `victim.h5`.

Reads a prepared dataset and OOD set(s) (any prepared dataset, converted to the victim's input shape); writes the
same `victim/1` artifact as `train` (objective "ini"), with per-epoch loss terms and held-out diagnostics. The
method is the package `stages/ini/` (in equations: docs/method.md); this stage reads the flags, builds the parts
and trains them. `--preset faithful` is the paper's recipe as its official code runs it; the options of the
"Beyond the paper" panel are not in the paper.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

import torch
import typer
from rich.console import Console
from torch import nn

import models
from models.params import UserError
from stages.core import options as _options
from stages.core.artifacts import prepare_output
from stages.core.options import BEYOND, DATA, INI_TERMS, RECIPE, RUNTIME
from stages.data import prepared as _data
from stages.ini import diagnose, fast, ood, surrogates
from stages.ini.objective import PAPER, SPIKE_FACTOR, Objective, SpikeClip
from stages.ini.reference import ReferenceStep
from stages.training import loop as _loop
from stages.training import torchrun as _torchrun
from stages.training import victim as _victim

console = Console(stderr=True)


@dataclass(frozen=True)
class Preset:
    """A recipe `--preset` names: the flag values it sets unless given, and the OOD sets it takes without `--ood`."""

    flags: dict
    mixture: bool = False  # every offline family of the victim's channel count, not the paper's one set
    near: bool = False  # and the near-distribution families of the victim's task (stages/ini/ood.py, NEAR_OOD)


# The presets (docs/method.md, "Presets"), merged once with the flags given explicitly.
# The paper's recipe as its official code runs it: one OOD set, augmented as ID images are, PCGrad's mean.
FAITHFUL = {
    "ood_derived": "",
    "ood_derived_fraction": 0.5,
    "ood_augment": "id",
    "clip": "official",
    "on_collapse": "warn",
    "pcgrad_reduction": "mean",
}
# Induction meant to hold on pools the defense never saw: a mixture of every offline family, heavily augmented,
# with a quarter of each OOD batch derived from ID images (at a half, one of four MNIST runs collapsed to one
# class for good; at a quarter the same run recovered, and victims ended 0.2-0.4 pt higher for somewhat weaker
# induction on a held-out family). The official mean divides the benign gradient by the number of terms; the sum
# took 5-epoch victims from 85.4% to 88.7% (FashionMNIST; undefended 89.0%) and from 98.6% to 99.0% (MNIST;
# 99.1%). Its larger steps collapsed 3 of 12 runs (every last-layer ReLU dead after a gradient spike): the spike
# clip prevents that, the rollback repairs it.
BROAD = {
    "ood_derived": "shuffle,mix,corrupt",
    "ood_derived_fraction": 0.25,
    "ood_augment": "heavy",
    "clip": "spike",
    "on_collapse": "rollback",
    "pcgrad_reduction": "sum",
}
PRESETS = {
    "faithful": Preset(FAITHFUL),
    "broad": Preset(BROAD, mixture=True),
    # induction meant to hold on pools that look like the victim's data: broad's recipe on broad's mixture and the
    # near-distribution families of the victim's task (glyphs, transformed digits, pen strokes for a digit victim)
    "near": Preset(BROAD, mixture=True, near=True),
}
MAX_ROLLBACKS = 3
# Flags that mean nothing while the flag they refine is off: left out of a victim's recipe identity.
INERT = {
    "ood_synthetic": ("ood_synthetic_steps", "ood_synthetic_eps"),
    "ood_derived": ("ood_derived_fraction",),
    "refresh_every": ("refresh", "refresh_steps"),
    "pcgrad": ("pcgrad_reduction",),
}


def run(
    dataset: _options.Dataset = "mnist",
    ood: Annotated[
        Optional[str],
        typer.Option(
            help="OOD set(s) (.h5 or names, comma-separated: a mixture balanced per set) for the induction and "
            "vanishing "
            "terms [default: faithful: per dataset, the paper's, prepared like the victim's own dataset (offline, "
            "else downloaded), else the next that can be: mnist -> kmnist, else fashionmnist; cifar10 -> "
            "tinyimagenet, else cifar100, else skimage-patches; broad: every offline family of the victim's channel "
            "count but its own and same-task sets].",
            rich_help_panel=DATA,
        ),
    ] = None,
    ood_derived: Annotated[
        Optional[str],
        typer.Option(
            help="Outliers derived from each ID batch, comma-separated: shuffle (patches in a random order), mix (two "
            "classes blended), corrupt (noise and half erased); '' for none [default: the preset's].",
            rich_help_panel=DATA,
        ),
    ] = None,
    ood_derived_fraction: Annotated[
        Optional[float],
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of each OOD batch made of derived outliers, when there are any "
            "[default: the preset's; 0.25 for broad].",
            rich_help_panel=DATA,
        ),
    ] = None,
    ood_augment: Annotated[
        Optional[Literal["id", "heavy"]],
        typer.Option(
            help="OOD augmentation: id (as ID images) or heavy (flips, transposition, inversion, gamma) "
            "[default: the preset's].",
            rich_help_panel=DATA,
        ),
    ] = None,
    arch: _options.Arch = "lenet5",
    preset: Annotated[
        Literal["faithful", "broad", "near"],
        typer.Option(
            help="faithful: the paper's recipe (one OOD set); broad: induction on a mixture of every offline family, "
            "heavily augmented, plus outliers derived from ID images, merged with PCGrad's sum, spikes clipped, "
            "collapses rolled back; near: broad, with the families that look like the victim's data added to the "
            "mixture (glyphs, transformed digits, pen strokes for a digit victim; silhouettes and recombined or "
            "transformed garments for a garment victim). Any of those flags given explicitly overrides it.",
            rich_help_panel=RECIPE,
        ),
    ] = "faithful",
    epochs: _options.Epochs = 50,
    batch_size: _options.BatchSize = _options.PAPER_SGD.batch_size,
    lr: _options.LR = _options.PAPER_SGD.lr,
    momentum: _options.Momentum = _options.PAPER_SGD.momentum,
    weight_decay: _options.WeightDecay = _options.PAPER_SGD.weight_decay,
    lr_step: _options.LRStep = _options.PAPER_SGD.lr_step,
    lr_gamma: _options.LRGamma = _options.PAPER_SGD.lr_gamma,
    seed: _options.Seed = 0,
    augment: _options.Augment = None,
    beta: Annotated[
        float, typer.Option(min=0.0, help="Weight of the ID distance term.", rich_help_panel=INI_TERMS)
    ] = PAPER.beta,
    gamma: Annotated[
        float, typer.Option(min=0.0, help="Weight of the OOD induction term.", rich_help_panel=INI_TERMS)
    ] = PAPER.gamma,
    delta: Annotated[
        float, typer.Option(min=0.0, help="Weight of the ID gradient isolation term.", rich_help_panel=INI_TERMS)
    ] = PAPER.delta,
    epsilon: Annotated[
        float, typer.Option(min=0.0, help="Weight of the OOD gradient vanishing term.", rich_help_panel=INI_TERMS)
    ] = PAPER.epsilon,
    distance: Annotated[
        Literal["l1", "kl"], typer.Option(help="Distance of the ID/OOD distance terms.", rich_help_panel=INI_TERMS)
    ] = PAPER.distance,
    pcgrad: Annotated[
        bool,
        typer.Option(
            help=f"Merge the terms' gradients with PCGrad (else clip at norm {PAPER.max_grad_norm:g}).",
            rich_help_panel=INI_TERMS,
        ),
    ] = PAPER.pcgrad,
    pcgrad_reduction: Annotated[
        Optional[Literal["mean", "sum"]],
        typer.Option(
            help="PCGrad over shared parameters: mean (the official code's only reachable choice; every term's "
            "gradient, "
            "the benign one too, divided by the number of terms) or sum [default: the preset's].",
            rich_help_panel=INI_TERMS,
        ),
    ] = None,
    clip: Annotated[
        Optional[Literal["official", "always", "spike"]],
        typer.Option(
            help=f"Gradient clipping: official (at norm {PAPER.max_grad_norm:g}, only without PCGrad), always (also "
            f"PCGrad's merged gradient) or spike (official, plus the merged gradient clipped at {SPIKE_FACTOR:g}x "
            "the running mean of the norms before it) [default: the preset's].",
            rich_help_panel=INI_TERMS,
        ),
    ] = None,
    ood_synthetic: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of each OOD batch turned into synthetic outliers: a few steps of gradient "
            "ascent on the victim-surrogate disagreement (what data-free thieves search for), "
            "then induced like the rest; 0: none.",
            rich_help_panel=BEYOND,
        ),
    ] = 0.0,
    ood_synthetic_steps: Annotated[
        int, typer.Option(min=1, help="Ascent steps per synthetic outlier.", rich_help_panel=BEYOND)
    ] = 3,
    ood_synthetic_eps: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="L-inf radius of the search around each OOD image (1: unbounded).",
            rich_help_panel=BEYOND,
        ),
    ] = 0.25,
    on_collapse: Annotated[
        Optional[Literal["warn", "rollback"]],
        typer.Option(
            help="When val accuracy falls to chance after a good epoch (the network collapsed): warn at the "
            "end, or roll "
            f"back to the best epoch with the learning rate halved (at most {MAX_ROLLBACKS} times) "
            "[default: the preset's].",
            rich_help_panel=BEYOND,
        ),
    ] = None,
    bn_mode: Annotated[
        Literal["mixed", "separate", "eval-ood", "joint"],
        typer.Option(
            help="Victim BatchNorm on OOD batches: mixed (official, test-time statistics blend ID and OOD), separate "
            "(own batch statistics, running ones ID-only), eval-ood (running statistics) or joint (ID and OOD in one "
            "forward: trained under the mixture statistics it is deployed with).",
            rich_help_panel=BEYOND,
        ),
    ] = PAPER.bn_mode,
    kl_direction: Annotated[
        Literal["official", "attacker"],
        typer.Option(
            help="Divergence of the gradient terms: official KL(p_C||p_V), or attacker KL(p_V||p_C) as soft-label "
            "thieves train.",
            rich_help_panel=BEYOND,
        ),
    ] = PAPER.kl_direction,
    surrogates: Annotated[
        int, typer.Option(min=1, help="Frozen random surrogates (an ensemble; terms averaged).", rich_help_panel=BEYOND)
    ] = 1,
    surrogate_archs: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated surrogate architectures, cycled over --surrogates [default: --arch].",
            rich_help_panel=BEYOND,
        ),
    ] = None,
    refresh_every: Annotated[
        int, typer.Option(min=0, help="Refresh the surrogates every N epochs (0: never).", rich_help_panel=BEYOND)
    ] = 0,
    refresh: Annotated[
        Literal["reinit", "distill"],
        typer.Option(
            help="reinit: new random surrogates; distill: train them briefly on the victim's OOD outputs.",
            rich_help_panel=BEYOND,
        ),
    ] = "reinit",
    refresh_steps: Annotated[
        int, typer.Option(min=1, help="SGD steps of one distill refresh.", rich_help_panel=BEYOND)
    ] = 100,
    out: Annotated[Path, typer.Option(help="Output victim HDF5.", rich_help_panel=RUNTIME)] = Path(
        "artifacts/victim-ini.h5"
    ),
    device: _options.Device = "auto",
    resume: _options.Resume = False,
    implementation: Annotated[
        Literal["auto", "fast", "reference"],
        typer.Option(
            help="fast (LeNet-5 only, same maths) or reference; auto picks fast when it can.", rich_help_panel=RUNTIME
        ),
    ] = "auto",
    compile_mode: Annotated[
        Literal["auto", "on", "off"],
        typer.Option(
            "--compile",
            help="Fuse the fast step's forward and Jacobian-vector kernels with torch.compile (same maths; "
            "needs a C++ compiler; tens of seconds of compiling, then faster steps). auto: on for CPU runs of "
            f"{fast.COMPILE_MIN_STEPS:,} steps or more, where it pays back.",
            rich_help_panel=RUNTIME,
        ),
    ] = "auto",
    diagnostic_images: Annotated[
        int,
        typer.Option(
            min=0, help="Val and OOD-test images for the per-epoch diagnostics (0: none).", rich_help_panel=RUNTIME
        ),
    ] = 2048,
) -> Optional[Path]:
    """Train a victim with InI (isolation and induction); choose the epoch on val."""
    params = _resolve(locals())
    started = time.time()
    out = prepare_output(out)
    data, ood_sets = _load(params)
    recipe = _loop.VictimRecipe.of(dataclasses.asdict(params), data)
    ranks = _torchrun.join(recipe.device)
    params = dataclasses.replace(
        params,
        dataset=str(data.path),
        ood=",".join(str(o.path) for o in ood_sets),
        device=recipe.device.split(":")[0],
        augment=recipe.augment,
        processes=ranks.world,
    )
    parts = _build(params, data, ood_sets, recipe, ranks)
    result = _loop.fit(
        parts.victim,
        data,
        parts.step,
        recipe,
        out,
        _loop.fingerprint(dataclasses.asdict(params)),
        resume,
        modules=parts.modules,
        begin_epoch=parts.begin_epoch,
        diagnostics=parts.diagnostics,
        title="train-ini",
        rollbacks=MAX_ROLLBACKS if params.on_collapse == "rollback" else 0,
    )
    if ranks.main:
        _save(out, params, data, ood_sets, parts, result, started)
    _torchrun.leave(ranks)
    return out if ranks.main else None


# ------------------------------------------------------------------------------------------------ flags

Flags = _options.flags_of(run, "processes")  # the flags resolved, and the processes a torchrun job trains on


def _resolve(flags: dict) -> "Flags":
    """The flags as the run uses and records them: the preset's value for every flag of it not given (one merge),
    surrogate architectures cycled over --surrogates; then every combination the flags alone can refute."""
    preset = PRESETS[flags["preset"]].flags
    merged = {**flags, **{k: v for k, v in preset.items() if flags[k] is None}}
    p = Flags(**{**merged, "ood_derived": ",".join(_names(merged["ood_derived"]))})
    _check(p)
    archs = _names(p.surrogate_archs or p.arch)
    return dataclasses.replace(p, surrogate_archs=[archs[i % len(archs)] for i in range(p.surrogates)])


def _check(p: "Flags") -> None:
    """Every invalid combination of flags, with the flag to change."""
    models.check_arch(p.arch)
    archs = _names(p.surrogate_archs or p.arch)
    for arch in archs:
        models.check_arch(arch, "--surrogate-archs")
    for kind in filter(None, p.ood_derived.split(",")):
        if kind not in ood.DERIVED:
            raise UserError(f"--ood-derived: unknown outlier kind {kind!r}; choose from {', '.join(ood.DERIVED)}")
    if p.ood_synthetic and not p.ood_synthetic_eps:
        raise UserError("--ood-synthetic-eps must be above 0")
    if p.ood is not None and not _names(p.ood):
        raise UserError("--ood names no set")
    for name in _names(p.ood or ""):
        _data.refuse_evaluation_only(name, "--ood")
    lenets = all(a == "lenet5" for a in (p.arch, *archs))
    if p.implementation == "fast" and not lenets:
        raise UserError("--implementation fast needs LeNet-5 victim and surrogates on 28x28 or 32x32 images")
    if p.compile_mode == "on":
        if p.implementation == "reference" or not lenets:
            raise UserError("--compile on needs the fast step (LeNet-5 victim and surrogates on 28x28 or 32x32 images)")
        if not fast.compiler_available():
            raise UserError("--compile on: no C++ compiler found (g++, c++ or clang++ on PATH, or $CXX)")
    _loop.pick_device(p.device)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def recipe_identity(params: dict, channels: int) -> tuple[dict, dict]:
    """The recipe identity (`_victim.identity`) of a victim train-ini made with these resolved flags, on images of
    `channels` channels (augmentation's default depends on them)."""
    flags = dict(params)
    if set(flags.get("surrogate_archs") or ()) <= {flags.get("arch", "lenet5")}:
        flags["surrogate_archs"] = None  # --arch for every surrogate: the default
    defaults = {**_options.defaults(run), **PRESETS[flags.get("preset", "faithful")].flags, "augment": channels == 3}
    return _victim.identity("ini", flags, defaults, INERT)


# ------------------------------------------------------------------------------------------------ load


def _load(p: "Flags") -> tuple[_data.Dataset, list[_data.Dataset]]:
    """The victim's dataset and the OOD sets, checked against each other and against the fast step."""
    data = _data.load(p.dataset)
    names = _names(p.ood) if p.ood else ood.default_ood(data, PRESETS[p.preset].mixture, PRESETS[p.preset].near)
    ood_sets = [_data.load(name, splits=("train", "test")) for name in names]
    for ood_data in ood_sets:
        if ood_data.sha256 == data.sha256:
            raise UserError(f"--ood {ood_data.path} is the victim's own dataset; InI needs out-of-distribution images")
        if not len(ood_data.splits["train"][1]):
            raise UserError(f"{ood_data.path}: the OOD train split holds no images")
    if len({o.sha256 for o in ood_sets}) < len(ood_sets):
        raise UserError("--ood names the same set twice")
    needs_fast = p.implementation == "fast" or p.compile_mode == "on"
    if needs_fast and not fast.fits("lenet5", data.shape[1]):
        raise UserError(
            "the fast step needs LeNet-5 victim and surrogates on 28x28 or 32x32 images; "
            f"{data.path} holds {data.shape[1]}x{data.shape[2]}"
        )
    return data, ood_sets


# ------------------------------------------------------------------------------------------------ build


@dataclass
class _Parts:
    """What `_build` makes for the training loop."""

    victim: nn.Module
    nets: list[nn.Module]  # the frozen surrogates the victim trains against
    step: Callable
    kernels: fast.Kernels
    use_fast: bool
    modules: dict[str, nn.Module]  # training state beside the victim, checkpointed
    begin_epoch: Callable[[int, torch.Generator], None]
    diagnostics: Callable[[], dict[str, float]]


def _build(
    p: "Flags", data: _data.Dataset, ood_sets: list[_data.Dataset], recipe: _loop.VictimRecipe, ranks: _torchrun.Ranks
) -> _Parts:
    """The victim, the surrogates, the OOD stream, the training step and the epoch hooks."""
    device = recipe.device
    torch.manual_seed(p.seed)
    victim = _victim.build_for(p.arch, data).to(device)
    nets = [surrogates.build(a, data, p.seed, j).to(device) for j, a in enumerate(p.surrogate_archs)]
    use_fast = p.implementation != "reference" and all(fast.supports(m, data.shape[1]) for m in (victim, *nets))
    steps = p.epochs * math.ceil(len(data.splits["train"][1]) / p.batch_size)
    kernels = fast.kernels_for(
        p.compile_mode,
        use_fast,
        device.split(":")[0],
        steps,
        say=console.print if ranks.main else lambda _: None,
        warn=lambda message: console.print(f"[yellow]warning:[/] {message}"),
    )
    ood_train = [_data.fit_images(o.splits["train"][0], data.shape).to(device) for o in ood_sets]
    stream = _ood_stream(p, ood_train, recipe, ranks, victim, nets)
    spike = SpikeClip(SPIKE_FACTOR).to(device) if p.clip == "spike" else None
    step = (
        fast.FastStep(victim, nets, stream, _objective(p), ranks, data.shape[1], kernels, spike)
        if use_fast
        else ReferenceStep(victim, nets, stream, _objective(p), ranks, spike)
    )

    def begin_epoch(epoch: int, gen: torch.Generator) -> None:
        if p.refresh_every and epoch and epoch % p.refresh_every == 0:
            surrogates.refresh(
                nets,
                archs=p.surrogate_archs,
                how=p.refresh,
                epoch=epoch,
                data=data,
                seed=p.seed,
                victim=victim,
                ood_images=torch.cat(ood_train),
                steps=p.refresh_steps,
                batch_size=p.batch_size,
                gen=gen,
            )
        stream.begin(gen)

    modules = {f"surrogate{j}": net for j, net in enumerate(nets)}
    if spike is not None:  # its running mean is training state: checkpointed, so resume is exact
        modules["spike_clip"] = spike
    return _Parts(
        victim=victim,
        nets=nets,
        step=step,
        kernels=kernels,
        use_fast=use_fast,
        modules=modules,
        begin_epoch=begin_epoch,
        diagnostics=_diagnostics(p, data, ood_sets, victim, nets, spike, device, ranks),
    )


def _objective(p: "Flags") -> Objective:
    """The loss terms and how they are merged (docs/method.md, "The objective")."""
    return Objective(
        beta=p.beta,
        gamma=p.gamma,
        delta=p.delta,
        epsilon=p.epsilon,
        distance=p.distance,
        kl_direction=p.kl_direction,
        pcgrad=p.pcgrad,
        pcgrad_reduction=p.pcgrad_reduction,
        bn_mode=p.bn_mode,
        clip_pcgrad=p.clip == "always",
    )


def _ood_stream(
    p: "Flags",
    ood_train: list[torch.Tensor],
    recipe: _loop.VictimRecipe,
    ranks: _torchrun.Ranks,
    victim: nn.Module,
    nets: list[nn.Module],
) -> ood.OodStream:
    """The OOD batches: the sets' images, outliers derived from ID batches, and synthetic ones on request."""
    stream = ood.OodStream(
        ood_train,
        p.batch_size,
        augment=recipe.augment,
        ranks=ranks,
        derived=p.ood_derived.split(",") if p.ood_derived else (),
        derived_fraction=p.ood_derived_fraction,
        heavy=p.ood_augment == "heavy",
    )
    if p.ood_synthetic:
        stream.synthesize = ood.Synthetic(victim, nets, p.ood_synthetic, p.ood_synthetic_steps, p.ood_synthetic_eps)
    return stream


def _diagnostics(
    p: "Flags",
    data: _data.Dataset,
    ood_sets: list[_data.Dataset],
    victim: nn.Module,
    nets: list[nn.Module],
    spike: Optional[SpikeClip],
    device: str,
    ranks: _torchrun.Ranks,
) -> Callable[[], dict[str, float]]:
    """The per-epoch held-out measures of induction and isolation, against the training surrogates and against a
    fresh one the victim never trained against."""
    fresh = [surrogates.build(p.arch, data, p.seed, surrogates.HELD_OUT).to(device)]
    val_x, val_y = (t[: p.diagnostic_images] for t in data.splits["val"])
    # held-out OOD images for the diagnostics: the first OOD set's test split (the faithful recipe's one set)
    ood_test = _data.fit_images(ood_sets[0].splits["test"][0][: p.diagnostic_images], data.shape)

    def diagnostics() -> dict[str, float]:
        if not ranks.main:  # only rank 0 keeps history
            return {}
        row = {} if spike is None else {"clipped_steps": float(spike.clipped)}  # so far, all epochs together
        if not p.diagnostic_images:
            return row
        for tag, group in (("", nets), ("_fresh", fresh)):
            scores = diagnose.diagnose(victim, group, val_x, val_y, ood_test, device, p.batch_size, p.kl_direction)
            row.update({f"diag_{k}{tag}": v for k, v in scores.items()})
        return row

    return diagnostics


# ------------------------------------------------------------------------------------------------ save, summarise


def _save(
    out: Path,
    p: "Flags",
    data: _data.Dataset,
    ood_sets: list[_data.Dataset],
    parts: _Parts,
    result: _loop.Result,
    started: float,
) -> None:
    p = dataclasses.replace(
        p,
        implementation="fast" if parts.use_fast else "reference",
        compile_mode="on" if fast.compiled_throughout(parts.kernels) else "off",
    )
    _victim.save(
        out,
        parts.victim,
        arch=p.arch,
        data=data,
        objective="ini",
        result=result,
        stage="train-ini",
        params=dataclasses.asdict(p),
        recipe=recipe_identity(dataclasses.asdict(p), data.shape[0]),
        inputs=[data.path, *(o.path for o in ood_sets)],
        seed=p.seed,
        started=started,
        extra={f"ini_surrogate{j}": net for j, net in enumerate(parts.nets)},
    )
    _loop.checkpoint_path(out).unlink(missing_ok=True)
    _loop.summarise(f"train-ini {p.arch} on {data.name} (OOD {'+'.join(o.name for o in ood_sets)})", data, result, out)
    last = {k: v[-1] for k, v in result.history.items() if k.startswith("diag_")}
    if last:
        console.print("last epoch: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))

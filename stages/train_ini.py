"""Train a victim with InI, Isolation and Induction (Guo et al., arXiv 2308.00958), and write `victim.h5`.

Reads a prepared dataset and an OOD set (any prepared dataset, converted to the victim's input shape); writes the
same `victim/1` artifact as `train` (objective "ini"), with per-epoch loss terms and held-out diagnostics.
Faithful to the official code by default (INI_SPEC §2); the options past `--bn-mode` go beyond the paper.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
import typer
from rich.console import Console

import models
from stages import _data, _ini, _ini_fast, _loop, _ood, _victim, train
from stages._artifacts import UserError, prepare_output

console = Console(stderr=True)

# OOD set per victim dataset, best first: the paper's choice, then what `prepare` makes offline.
DEFAULT_OOD = {
    "mnist": ("kmnist", "fashionmnist"),
    "fashionmnist": ("kmnist", "mnist"),
    "kmnist": ("fashionmnist", "mnist"),
    "emnist-letters": ("kmnist", "fashionmnist"),
    "emnist-digits": ("kmnist", "fashionmnist"),
    "cifar10": ("tinyimagenet", "cifar100", "skimage-patches"),
    "cifar100": ("tinyimagenet", "cifar10", "skimage-patches"),
    "svhn": ("tinyimagenet", "cifar10", "skimage-patches"),
    "tinyimagenet": ("cifar100", "skimage-patches"),
}
FALLBACK_OOD = {1: ("kmnist", "fashionmnist", "mnist", "generated"),
                3: ("tinyimagenet", "skimage-patches", "generated")}
# The "broad" preset's OOD mixture: every family of the victim's channel count that prepare can make, except the
# victim's own and the sets of the same task (digits for a digit victim: a thief's digits should be answered).
BROAD_OOD = {1: ("fashionmnist", "mnist", "kmnist", "emnist-letters", "skimage-patches", "generated"),
             3: ("cifar100", "cifar10", "tinyimagenet", "skimage-patches", "generated")}
SAME_TASK = {"mnist": {"sklearn-digits", "emnist-digits", "svhn"}, "emnist-digits": {"mnist", "sklearn-digits"},
             "cifar10": {"cifar100"}, "cifar100": {"cifar10"}}
# Presets: the paper's recipe, and the one issue 7 measures against pools the defense never saw.
# broad derives a quarter of each OOD batch: at a half, one of four MNIST runs collapsed to one class at epoch 2 and
# stayed there; at a quarter the same run collapsed at epoch 2 too but recovered at epoch 3, and the quarter's victims
# end 0.2-0.4 pt higher, for somewhat weaker induction on a held-out family (docs/results.md)
COMPILE_MIN_STEPS = 1000  # 7-30 ms saved a CPU step (2 threads / 1 thread) against 5-30 s of compiling (measured)
# broad (stop 11) also merges with PCGrad's sum, clips gradient spikes and rolls a collapse back. The official mean
# divides the benign gradient by the number of terms: at 5 epochs, sum took broad victims from 85.4% to 88.7%
# (FashionMNIST; undefended 89.0%) and from 98.6% to 99.0% (MNIST; 99.1%), and lowered a held-out pool's theft. With
# the sum, steps are larger: 3 of 12 broad runs collapsed (every last-layer ReLU dead after a gradient spike), which
# --clip spike prevents and --on-collapse rollback repairs.
PRESETS = {"faithful": {"ood_derived": "", "ood_derived_fraction": 0.5, "ood_augment": "id", "clip": "official",
                        "on_collapse": "warn", "pcgrad_reduction": "mean"},
           "broad": {"ood_derived": "shuffle,mix,corrupt", "ood_derived_fraction": 0.25, "ood_augment": "heavy",
                     "clip": "spike", "on_collapse": "rollback", "pcgrad_reduction": "sum"}}
MAX_ROLLBACKS = 3
SPIKE_FACTOR = 2.0  # --clip spike: the norm of the step that killed a broad victim was 11x the running mean

# "distill" refresh: a few SGD steps of KL(p_V || p_C) on OOD images, KnockoffNets' loss at a gentle rate.
DISTILL_LR, DISTILL_MOMENTUM, DISTILL_WD = 0.01, 0.9, 5e-4


def run(
    dataset: Annotated[str, typer.Option(help="Prepared dataset (.h5) or dataset name.")] = "mnist",
    arch: Annotated[str, typer.Option(help=f"Architecture: {', '.join(models.MODELS)}.")] = "lenet5",
    out: Annotated[Path, typer.Option(help="Output victim HDF5.")] = Path("artifacts/victim-ini.h5"),
    preset: Annotated[Literal["faithful", "broad"], typer.Option(
        help="faithful: the paper's recipe (one OOD set); broad: induction on a mixture of every offline family, "
             "heavily augmented, plus outliers derived from ID images (--ood, --ood-derived and --ood-augment "
             "override it).")] = "faithful",
    ood: Annotated[Optional[str], typer.Option(
        help="OOD set(s) (.h5 or names, comma-separated: a mixture balanced per set) for the induction and vanishing "
             "terms [default: faithful: per dataset, the paper's when prepare can make it offline: mnist -> kmnist, "
             "else fashionmnist; cifar10 -> tinyimagenet, else cifar100, else skimage-patches; broad: every offline "
             "family of the victim's channel count but its own and same-task sets].")] = None,
    ood_derived: Annotated[Optional[str], typer.Option(
        help="Outliers derived from each ID batch, comma-separated: shuffle (patches in a random order), mix (two "
             "classes blended), corrupt (noise and half erased); '' for none [default: the preset's].")] = None,
    ood_derived_fraction: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="Share of each OOD batch made of derived outliers, when there are any "
                               "[default: the preset's; 0.25 for broad].")] = None,
    ood_augment: Annotated[Optional[Literal["id", "heavy"]], typer.Option(
        help="OOD augmentation: id (as ID images) or heavy (flips, transposition, inversion, gamma) "
             "[default: the preset's].")] = None,
    ood_synthetic: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of each OOD batch turned into synthetic outliers: a few steps of gradient "
                               "ascent on the victim-surrogate disagreement (what data-free thieves search for), "
                               "then induced like the rest; 0: none.")] = 0.0,
    ood_synthetic_steps: Annotated[int, typer.Option(min=1, help="Ascent steps per synthetic outlier.")] = 3,
    ood_synthetic_eps: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="L-inf radius of the search around each OOD image (1: unbounded).")] = 0.25,
    epochs: _loop.Epochs = 50,
    batch_size: _loop.BatchSize = 128,
    lr: _loop.LR = 0.1,
    momentum: _loop.Momentum = 0.5,
    weight_decay: _loop.WeightDecay = 1e-3,
    lr_step: _loop.LRStep = 20,
    lr_gamma: _loop.LRGamma = 0.1,
    seed: _loop.Seed = 0,
    device: _loop.Device = "auto",
    augment: _loop.Augment = None,
    resume: _loop.Resume = False,
    beta: Annotated[float, typer.Option(min=0.0, help="Weight of the ID distance term.")] = 0.0,
    gamma: Annotated[float, typer.Option(min=0.0, help="Weight of the OOD induction term.")] = 0.3,
    delta: Annotated[float, typer.Option(min=0.0, help="Weight of the ID gradient isolation term.")] = 1.0,
    epsilon: Annotated[float, typer.Option(min=0.0, help="Weight of the OOD gradient vanishing term.")] = 1000.0,
    distance: Annotated[Literal["l1", "kl"], typer.Option(help="Distance of the ID/OOD distance terms.")] = "l1",
    pcgrad: Annotated[bool, typer.Option(help="Merge the terms' gradients with PCGrad (else clip at norm 10).")] = True,
    pcgrad_reduction: Annotated[Optional[Literal["mean", "sum"]], typer.Option(
        help="PCGrad over shared parameters: mean (the official code's only reachable choice; every term's gradient, "
             "the benign one too, divided by the number of terms) or sum [default: the preset's].")] = None,
    clip: Annotated[Optional[Literal["official", "always", "spike"]], typer.Option(
        help="Gradient clipping: official (at norm 10, only without PCGrad), always (also PCGrad's merged gradient) "
             f"or spike (official, plus the merged gradient clipped at {SPIKE_FACTOR:g}x the running mean of the "
             "norms before it) [default: the preset's].")] = None,
    on_collapse: Annotated[Optional[Literal["warn", "rollback"]], typer.Option(
        help="When val accuracy falls to chance after a good epoch (the network collapsed): warn at the end, or roll "
             f"back to the best epoch with the learning rate halved (at most {MAX_ROLLBACKS} times) "
             "[default: the preset's].")] = None,
    bn_mode: Annotated[Literal["mixed", "separate", "eval-ood", "joint"], typer.Option(
        help="Victim BatchNorm on OOD batches: mixed (official, test-time statistics blend ID and OOD), separate "
             "(own batch statistics, running ones ID-only), eval-ood (running statistics) or joint (ID and OOD in one "
             "forward: trained under the mixture statistics it is deployed with).")] = "mixed",
    kl_direction: Annotated[Literal["official", "attacker"], typer.Option(
        help="Divergence of the gradient terms: official KL(p_C||p_V), or attacker KL(p_V||p_C) as soft-label "
             "thieves train.")] = "official",
    surrogates: Annotated[int, typer.Option(min=1, help="Frozen random surrogates (an ensemble; terms averaged).")] = 1,
    surrogate_archs: Annotated[Optional[str], typer.Option(
        help="Comma-separated surrogate architectures, cycled over --surrogates [default: --arch].")] = None,
    refresh_every: Annotated[int, typer.Option(min=0, help="Refresh the surrogates every N epochs (0: never).")] = 0,
    refresh: Annotated[Literal["reinit", "distill"], typer.Option(
        help="reinit: new random surrogates; distill: train them briefly on the victim's OOD outputs.")] = "reinit",
    refresh_steps: Annotated[int, typer.Option(min=1, help="SGD steps of one distill refresh.")] = 100,
    implementation: Annotated[Literal["auto", "fast", "reference"], typer.Option(
        help="fast (LeNet-5 only, same maths) or reference; auto picks fast when it can.")] = "auto",
    compile_mode: Annotated[Literal["auto", "on", "off"], typer.Option(
        "--compile", help="Fuse the fast step's forward and Jacobian-vector kernels with torch.compile (same maths; "
        "needs a C++ compiler; tens of seconds of compiling, then faster steps). auto: on for CPU runs of "
        f"{COMPILE_MIN_STEPS:,} steps or more, where it pays back.")] = "auto",
    diagnostic_images: Annotated[int, typer.Option(
        min=0, help="Val and OOD-test images for the per-epoch diagnostics (0: none).")] = 2048,
) -> Optional[Path]:
    """Train a victim with InI (isolation and induction); choose the epoch on val."""
    started = time.time()
    params = dict(locals())
    params.pop("started")
    if arch not in models.MODELS:
        raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(models.MODELS)}")
    archs = [a.strip() for a in (surrogate_archs or arch).split(",")]
    for a in archs:
        if a not in models.MODELS:
            raise UserError(f"--surrogate-archs: unknown architecture {a!r}; choose from {', '.join(models.MODELS)}")
    archs = [archs[i % len(archs)] for i in range(surrogates)]
    ood_derived = PRESETS[preset]["ood_derived"] if ood_derived is None else ood_derived
    derived = [k.strip() for k in ood_derived.split(",") if k.strip()]
    for k in derived:
        if k not in _ood.DERIVED:
            raise UserError(f"--ood-derived: unknown outlier kind {k!r}; choose from {', '.join(_ood.DERIVED)}")
    ood_augment = ood_augment or PRESETS[preset]["ood_augment"]
    if ood_synthetic and not ood_synthetic_eps:
        raise UserError("--ood-synthetic-eps must be above 0")
    if ood_derived_fraction is None:
        ood_derived_fraction = PRESETS[preset]["ood_derived_fraction"]
    for name in (ood or "").split(","):
        if name.strip():
            _data.refuse_evaluation_only(name.strip(), "--ood")
    out = prepare_output(out)
    data = _data.load(dataset)
    names = [n.strip() for n in ood.split(",") if n.strip()] if ood else default_ood(data, preset)
    if not names:
        raise UserError("--ood names no set")
    ood_sets = [_data.load(name, splits=("train", "test")) for name in names]
    for ood_data in ood_sets:
        if ood_data.sha256 == data.sha256:
            raise UserError(f"--ood {ood_data.path} is the victim's own dataset; InI needs out-of-distribution images")
    if len({o.sha256 for o in ood_sets}) < len(ood_sets):
        raise UserError("--ood names the same set twice")
    recipe = _loop.Recipe(epochs, batch_size, lr, momentum, weight_decay, lr_step, lr_gamma, seed,
                          _loop.pick_device(device), data.shape[0] == 3 if augment is None else augment)
    comm = _loop.distributed(recipe.device)
    clip = clip or PRESETS[preset]["clip"]
    pcgrad_reduction = pcgrad_reduction or PRESETS[preset]["pcgrad_reduction"]
    on_collapse = on_collapse or PRESETS[preset]["on_collapse"]
    objective = _ini.Objective(beta, gamma, delta, epsilon, distance, kl_direction, pcgrad, pcgrad_reduction, bn_mode,
                               clip_pcgrad=clip == "always")

    torch.manual_seed(seed)
    victim = _victim.build_for(arch, data).to(recipe.device)
    nets = [build_surrogate(a, data, seed, j).to(recipe.device) for j, a in enumerate(archs)]
    fresh = [build_surrogate(arch, data, seed, -1).to(recipe.device)]  # never trained against: held-out diagnostics
    fast = all(_ini_fast.supports(m, data.shape[1]) for m in (victim, *nets))
    if implementation == "fast" and not fast:
        raise UserError("--implementation fast needs LeNet-5 victim and surrogates on 28x28 or 32x32 images")
    use_fast = fast and implementation != "reference"
    steps = epochs * math.ceil(len(data.splits["train"][1]) / batch_size)
    kernels = step_kernels(compile_mode, use_fast, recipe.device.split(":")[0], steps, say=comm.main)
    params.update(dataset=str(data.path), ood=",".join(str(o.path) for o in ood_sets), ood_derived=",".join(derived),
                  ood_derived_fraction=ood_derived_fraction, ood_augment=ood_augment, clip=clip, on_collapse=on_collapse,
                  pcgrad_reduction=pcgrad_reduction, device=recipe.device.split(":")[0], augment=recipe.augment,
                  surrogate_archs=archs, processes=comm.world)

    ood_train = [_data.fit_images(o.splits["train"][0], data.shape).to(recipe.device) for o in ood_sets]
    for o, images in zip(ood_sets, ood_train):
        if not len(images):
            raise UserError(f"{o.path}: the OOD train split holds no images")
    stream = _ood.OodStream(ood_train, batch_size, recipe.augment, comm, derived, ood_derived_fraction,
                            heavy=ood_augment == "heavy")
    if ood_synthetic:
        stream.synthesize = _ood.Synthetic(victim, nets, ood_synthetic, ood_synthetic_steps, ood_synthetic_eps)
    spike = _ini.SpikeClip(SPIKE_FACTOR).to(recipe.device) if clip == "spike" else None
    step = (_ini_fast.FastStep(victim, nets, stream, objective, comm, data.shape[1], kernels, spike) if use_fast
            else _ini.ReferenceStep(victim, nets, stream, objective, comm, spike))

    def begin_epoch(epoch: int, gen: torch.Generator) -> None:
        if refresh_every and epoch and epoch % refresh_every == 0:
            if refresh == "reinit":
                for j, (net, a) in enumerate(zip(nets, archs)):
                    net.load_state_dict(build_surrogate(a, data, seed, j, generation=epoch).state_dict())
            else:
                distill(nets, victim, torch.cat(ood_train), refresh_steps, batch_size, gen)
        stream.begin(gen)

    n_diag = diagnostic_images
    val_x, val_y = (t[:n_diag] for t in data.splits["val"])
    # held-out OOD images for the diagnostics: the first --ood set's test split (the faithful recipe's one set)
    ood_test = _data.fit_images(ood_sets[0].splits["test"][0][:n_diag], data.shape)

    def diagnostics() -> dict[str, float]:
        if not comm.main:  # only rank 0 keeps history
            return {}
        row = {} if spike is None else {"clipped_steps": float(spike.clipped)}  # so far, all epochs together
        if not n_diag:
            return row
        for tag, group in (("", nets), ("_fresh", fresh)):
            scores = _ini.diagnose(victim, group, val_x, val_y, ood_test, recipe.device, batch_size, kl_direction)
            row.update({f"diag_{k}{tag}": v for k, v in scores.items()})
        return row

    modules = {f"surrogate{j}": net for j, net in enumerate(nets)}
    if spike is not None:  # its running mean is training state: checkpointed, so resume is exact
        modules["spike_clip"] = spike
    result = _loop.fit(victim, data, step, recipe, out, _loop.fingerprint(params), resume, modules=modules,
                       begin_epoch=begin_epoch, diagnostics=diagnostics, title="train-ini",
                       rollbacks=MAX_ROLLBACKS if on_collapse == "rollback" else 0)
    if not comm.main:
        _loop.leave(comm)
        return None
    params["implementation"] = "fast" if use_fast else "reference"
    params["compile_mode"] = "on" if _ini_fast.compiled_throughout(kernels) else "off"
    _victim.save(out, victim, arch, data, "ini", result, "train-ini", params, [data.path, *(o.path for o in ood_sets)],
                 seed, started, extra={f"ini_surrogate{j}": net for j, net in enumerate(nets)})
    _loop.checkpoint_path(out).unlink(missing_ok=True)
    _loop.leave(comm)
    train.summarise(f"train-ini {arch} on {data.name} (OOD {'+'.join(o.name for o in ood_sets)})", data, result, out)
    last = {k: v[-1] for k, v in result.history.items() if k.startswith("diag_")}
    if last:
        console.print("last epoch: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    return out


def step_kernels(mode: str, use_fast: bool, device: str, steps: int, say: bool = True) -> _ini_fast.Kernels:
    """The fast step's kernels for --compile: compiled when asked (on), or (auto) on CPU for runs long enough to pay
    back the compiling, when a C++ compiler is found; eager otherwise."""
    if mode == "on":
        if not use_fast:
            raise UserError("--compile on needs the fast step (LeNet-5 victim and surrogates on 28x28 or 32x32 images)")
        if not _ini_fast.compiler_available():
            raise UserError("--compile on: no C++ compiler found (g++, c++ or clang++ on PATH, or $CXX)")
    elif not (mode == "auto" and use_fast and device == "cpu" and steps >= COMPILE_MIN_STEPS
              and _ini_fast.compiler_available()):
        return _ini_fast.EAGER
    if say:
        console.print("compiling the InI step's kernels with torch.compile: the first steps take tens of seconds")
    return _ini_fast.compiled_kernels(mode == "on", lambda message: console.print(f"[yellow]warning:[/] {message}"))


def default_ood(data: _data.Dataset, preset: str = "faithful") -> list[str]:
    """faithful: the first candidate already prepared, or that `prepare` can make without the network; broad: every
    such candidate of the broad mixture."""
    from stages import _sources, prepare

    if preset == "broad":
        channels = 1 if data.shape[0] == 1 else 3
        candidates = [n for n in BROAD_OOD[channels] if n != data.name and n not in SAME_TASK.get(data.name, ())]
    else:
        candidates = DEFAULT_OOD.get(data.name, FALLBACK_OOD.get(data.shape[0], FALLBACK_OOD[3]))
    found = []
    for name in candidates:
        if name == data.name or name not in _sources.DATASETS:
            continue
        path = prepare.default_path(name)
        if not path.exists():
            try:
                prepare.run(dataset=name, out=path, download=False)
            except UserError as e:
                console.print(f"OOD candidate {name} unavailable offline ({e}); trying the next")
                continue
        found.append(str(path))
        if preset != "broad":
            break
    if not found:
        raise UserError(f"no OOD set for {data.name} could be prepared offline; pass --ood")
    return found


def surrogate_seed(seed: int, index: int, generation: int = 0) -> int:
    """Seed of surrogate `index` (-1: the held-out one) in refresh `generation`, derived from --seed."""
    return (seed * 1_000_003 + 7_919 * (index + 2) + 104_729 * generation) % (2**63)


def build_surrogate(arch: str, data: _data.Dataset, seed: int, index: int, generation: int = 0) -> torch.nn.Module:
    """A randomly initialised network, frozen in eval mode (the paper's 'clone'; our word for it is surrogate)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(surrogate_seed(seed, index, generation))
        net = _victim.build_for(arch, data)
    return net.eval().requires_grad_(False)


def distill(nets: list[torch.nn.Module], victim: torch.nn.Module, ood_images: torch.Tensor, steps: int,
            batch_size: int, gen: torch.Generator) -> None:
    """Train each surrogate for `steps` SGD steps to match the victim's probabilities on OOD images, as a thief
    querying with OOD data would (soft labels, KL(p_V || p_C)); then freeze it again."""
    was_training = victim.training
    victim.eval()
    for net in nets:
        net.train().requires_grad_(True)
        opt = torch.optim.SGD(net.parameters(), lr=DISTILL_LR, momentum=DISTILL_MOMENTUM, weight_decay=DISTILL_WD)
        for _ in range(steps):
            idx = torch.randint(len(ood_images), (batch_size,), generator=gen)
            x = _data.to_float(ood_images[idx.to(ood_images.device)])
            with torch.no_grad():
                target = victim(x).softmax(-1)
            loss = F.kl_div(net(x).log_softmax(-1), target, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval().requires_grad_(False)
    victim.train(was_training)


def diagnose_victim(victim_path: Path, dataset: str, ood: str, seed: int = 0, surrogates: int = 1,
                    images: int = 2048, device: str = "cpu") -> dict[str, float]:
    """The per-epoch diagnostics for any victim (an undefended one too), against the surrogates train-ini would
    build with `seed` and the held-out one: comparable numbers for defended and undefended victims."""
    victim, info = _victim.load(Path(victim_path), device)
    data = _data.load(dataset)
    _victim.check_matches(info, data)
    ood_data = _data.load(ood, splits=("test",))
    val_x, val_y = (t[:images] for t in data.splits["val"])
    ood_test = _data.fit_images(ood_data.splits["test"][0][:images], data.shape)
    row = {}
    groups = (("", [build_surrogate(info.arch, data, seed, j).to(device) for j in range(surrogates)]),
              ("_fresh", [build_surrogate(info.arch, data, seed, -1).to(device)]))
    for tag, group in groups:
        scores = _ini.diagnose(victim, group, val_x, val_y, ood_test, device)
        row.update({f"diag_{k}{tag}": v for k, v in scores.items()})
    return row


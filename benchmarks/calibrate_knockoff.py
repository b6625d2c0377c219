"""Calibrate our KnockoffNets against an independent implementation: the Adversarial Robustness Toolbox's
KnockoffNets (random strategy) with the same LeNet-5 thief, budget, pool and epochs, side by side per cell.

    python benchmarks/calibrate_knockoff.py --victim V.h5 [--victim W.h5] --pool P.h5 [--pool Q.h5] \
        --budget 18000 --epochs 30 [--label soft --label hard] [--seed 0 --seed 1 ...] [--ours-param KEY=VALUE ...] \
        [--shared-queries] [--json out.json]
    python benchmarks/calibrate_knockoff.py --merge a.json b.json ...   # the table of earlier runs, together

Each cell (victim x pool x label) trains our surrogate through `steal` and ART's through `KnockoffNets.extract`
against the same deployed graph (images in [0, 1] -> probabilities), and scores both on the victim's test split,
once per seed. The table gives each thief's mean ± sample std over the seeds (n) and the difference of the means:
against a victim whose answers are nearly uniform a surrogate's accuracy moves by several points with its seed
alone, so one seed cannot tell a weaker recipe from a different draw. ART is an optional extra (`pip install -e
'.[calibration]'`); without it only our thief runs.

`--json` writes the run's record: the command, both thieves' recipes as they ran (ours read back from the first
surrogate's recorded flags), the seeds (fixed on the command line before the run: the seed plan), the device and
the versions of Python, torch, NumPy and ART, then one row per cell and seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

console = Console(stderr=True)


def ours(
    victim: Path,
    pool: Path,
    label: str,
    budget: int,
    epochs: int,
    seed: int,
    params: list[str],
    folder: Path,
    recipe: dict,
    device: str = "cpu",
) -> float:
    from stages import steal

    out = folder / f"ours-{victim.stem}-{pool.stem}-{label}-s{seed}.h5"
    steal.run(
        victim=victim,
        pool=str(pool),
        label=label,
        budget=budget,
        epochs=epochs,
        seed=seed,
        device=device,
        attack_param=params or None,
        out=out,
        **recipe,
    )
    with h5py.File(out, "r") as f:
        return float(f.attrs["stealing_accuracy"]), json.loads(f.attrs["params"])


OUR_RECIPE = ("attack", "arch", "optimizer", "schedule", "lr", "momentum", "weight_decay", "batch_size")
OUR_RECIPE += ("attack_params",)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def record(args: argparse.Namespace, seeds: list[int], ours_params: dict, have_art: bool, rows: list[dict]) -> dict:
    """What `--json` writes: enough to rerun the calibration and to tell runs on different machines apart."""
    where = args.device
    if where.startswith("cuda"):
        where += f" ({torch.cuda.get_device_name(torch.device(where))})"
    art = {
        "optimizer": args.art_optimizer,
        "lr": args.art_lr,
        "momentum": 0.9 if args.art_optimizer == "sgd" else None,
        "weight_decay": 5e-4 if args.art_optimizer == "sgd" else 0.0,
        "batch_size_fit": 128,
        "batch_size_query": 500,
        "sampling_strategy": "random",
        "schedule": "constant",
    }
    return {
        "command": " ".join(["python", *sys.argv]),
        "recipe": {
            "budget": args.budget,
            "epochs": args.epochs,
            "ours": {k: ours_params.get(k) for k in OUR_RECIPE},
            "art": art if have_art else None,
            "shared_queries": args.shared_queries,
        },
        "victims": [str(v) for v in args.victim],
        "pools": [str(p) for p in args.pool],
        "labels": args.label or ["soft", "hard"],
        "seeds": seeds,
        "device": where,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "adversarial-robustness-toolbox": _version("adversarial-robustness-toolbox") if have_art else None,
            "platform": platform.platform(),
        },
        "rows": rows,
    }


def _target(victim: Path, pool: Path):
    """What both of ART's runs start from: the victim as deployed (images in [0, 1] -> probabilities), what it
    declares, its dataset, and the pool's train split at the victim's input shape (uint8)."""
    from stages.attacks import blackbox as _blackbox
    from stages.data import prepared as _data

    graph, info = _blackbox.open_victim(victim, "cpu")
    data = _data.load(info.dataset_path if Path(info.dataset_path).exists() else info.dataset)
    pool_x = _data.fit_images(_data.load(str(pool), splits=("train",)).splits["train"][0], data.shape)
    return graph, info, data, pool_x


def art_thief(
    victim: Path,
    pool: Path,
    label: str,
    budget: int,
    epochs: int,
    seed: int,
    optimizer: str,
    lr: float,
    device: str = "cpu",
) -> float:
    """ART's KnockoffNets: constant learning rate, no schedule, soft targets through torch's cross-entropy."""
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification import PyTorchClassifier

    import models

    graph, info, data, pool_x = _target(victim, pool)
    shape, classes = tuple(data.shape), data.num_classes
    where = "gpu" if device.startswith("cuda") else "cpu"  # ART's names; it takes the first GPU
    victim_art = PyTorchClassifier(
        model=graph,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=shape,
        nb_classes=classes,
        clip_values=(0.0, 1.0),
        device_type=where,
    )
    torch.manual_seed(seed)
    np.random.seed(seed)
    net = models.build_model(info.arch, classes, shape[0], shape[1], data.mean, data.std)
    opt = (
        torch.optim.Adam(net.parameters(), lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    )
    thief = PyTorchClassifier(
        model=net,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=opt,
        input_shape=shape,
        nb_classes=classes,
        clip_values=(0.0, 1.0),
        device_type=where,
    )
    attack = KnockoffNets(
        victim_art,
        batch_size_fit=128,
        batch_size_query=500,
        nb_epochs=epochs,
        nb_stolen=budget,
        sampling_strategy="random",
        use_probability=label == "soft",
        verbose=False,
    )
    stolen = attack.extract(pool_x.float().div(255).numpy(), thieved_classifier=thief)
    test_x, test_y = data.splits["test"]
    predictions = stolen.predict(test_x.float().div(255).numpy(), batch_size=1000).argmax(1)
    return float((predictions == test_y.numpy()).mean())


def shared_queries(victim: Path, pool: Path, label: str, budget: int, epochs: int, seed: int) -> tuple[float, float]:
    """Both training loops on one transfer set: ART's draw of `budget` pool images (its `np.random.choice` for the
    seed) and the victim's answers to them, the surrogate initialised alike (torch seed), Adam at steal's rate,
    batch 128. Only the loops differ (their shuffling; ours drops the last partial batch), so a gap here is the
    recipe's and a gap only in the side-by-side run is the draw's. Returns (our loop's, ART's loop's) accuracy."""
    from art.estimators.classification import PyTorchClassifier

    import models
    from stages.attacks import blackbox as _blackbox
    from stages.attacks._thief import SurrogateRecipe, Thief, train_surrogate
    from stages.data import prepared as _data
    from stages.steal import ADAM_LR

    graph, info, data, pool_x = _target(victim, pool)
    shape, classes = tuple(data.shape), data.num_classes
    np.random.seed(seed)
    x = pool_x[torch.from_numpy(np.random.choice(len(pool_x), min(budget, len(pool_x)), replace=False))]
    with torch.no_grad():
        probs = torch.cat([graph(_data.to_float(x[i : i + 1000])) for i in range(0, len(x), 1000)])
    targets = probs if label == "soft" else probs.argmax(1)
    test_x, test_y = data.splits["test"]

    def fresh() -> torch.nn.Module:
        torch.manual_seed(seed)
        return models.build_model(info.arch, classes, shape[0], shape[1], data.mean, data.std)

    def score(net: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(
                (_blackbox.predict(net.eval(), _data.to_float(test_x), "cpu").argmax(1) == test_y).float().mean()
            )

    net = fresh()
    recipe = SurrogateRecipe(epochs, 128, ADAM_LR, 0.0, 0.0, "adam", "constant")
    thief = Thief(net, recipe, classes, shape, torch.Generator().manual_seed(seed))
    train_surrogate(thief, x, targets, epochs)
    mine = score(net)
    net = fresh()
    torch.manual_seed(seed)  # ART's loader shuffles with torch's global generator
    art = PyTorchClassifier(
        model=net,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(net.parameters(), lr=ADAM_LR),
        input_shape=shape,
        nb_classes=classes,
        clip_values=(0.0, 1.0),
    )
    answers = probs.numpy() if label == "soft" else np.eye(classes, dtype=np.float32)[targets.numpy()]
    art.fit(_data.to_float(x).numpy(), answers, batch_size=128, nb_epochs=epochs, verbose=False)
    return mine, score(net)


def _spread(values: list[float]) -> str:
    if not values:
        return ""
    std = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{100 * statistics.mean(values):.1f}{std} ({len(values)})"


def table(rows: list[dict], title: str) -> Table:
    """One line per cell: each thief's stealing accuracy, mean ± sample std over seeds (n), and ours - ART's mean."""
    keys = ("ours", "art", "ours_shared", "art_shared")
    cells: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        cell = cells.setdefault((Path(r["victim"]).stem, Path(r["pool"]).stem, r["label"]), {k: [] for k in keys})
        for k in keys:
            if r.get(k) is not None:
                cell[k].append(r[k])
    shared = any(cell["ours_shared"] for cell in cells.values())
    out = Table(title=title, title_justify="left")
    columns = ["victim", "pool", "label", "ours", "ART", "ours - ART"]
    for column in columns + (["our loop, shared queries", "ART's loop, shared queries"] if shared else []):
        out.add_column(column)

    def gap(a: list[float], b: list[float]) -> str:
        return f"{100 * (statistics.mean(a) - statistics.mean(b)):+.1f}" if a and b else ""

    for (victim, pool, label), cell in cells.items():
        line = [victim, pool, label, _spread(cell["ours"]), _spread(cell["art"]), gap(cell["ours"], cell["art"])]
        out.add_row(*line, *([_spread(cell["ours_shared"]), _spread(cell["art_shared"])] if shared else []))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", type=Path, action="append")
    parser.add_argument("--pool", type=Path, action="append")
    parser.add_argument("--label", action="append", choices=("soft", "hard"))
    parser.add_argument("--budget", type=int, default=18_000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, action="append", help="repeat for several seeds (default: 0)")
    parser.add_argument("--ours-param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ours-optimizer", choices=("sgd", "adam"), help="default: steal's for knockoff")
    parser.add_argument("--ours-schedule", choices=("cosine", "constant"), help="default: steal's for knockoff")
    parser.add_argument("--ours-lr", type=float, help="default: steal's for the optimizer")
    parser.add_argument("--art-optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--art-lr", type=float, default=1e-3)
    parser.add_argument(
        "--device",
        default="cpu",
        help="where both thieves train: auto, cpu or cuda[:N]; --shared-queries runs on the CPU",
    )
    parser.add_argument("--no-art", action="store_true", help="run our thief only")
    parser.add_argument(
        "--shared-queries",
        action="store_true",
        help="also train both loops on one transfer set (ART's draw), to tell the recipe from the draw",
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--keep", type=Path, help="keep our surrogates (with their transfer sets) in this folder")
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="print the table of these --json files' rows; run nothing"
    )
    args = parser.parse_args()
    if args.merge:
        # One table per device and torch version: runs on other hardware or another torch are not pooled silently.
        groups: dict[tuple[str, str], tuple[list[str], list[dict]]] = {}
        try:
            for path in args.merge:
                run = json.loads(path.read_text())
                key = (str(run["device"]).split(" (")[0], str(run["versions"]["torch"]))
                names, rows = groups.setdefault(key, ([], []))
                names.append(path.name)
                rows.extend(run["rows"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --merge takes the --json files of earlier runs: {e}") from None
        for (device, torch_version), (names, rows) in groups.items():
            title = f"knockoff calibration on {device}, torch {torch_version}: {', '.join(names)}"
            console.print(table(rows, title))
        return
    if not args.victim or not args.pool:
        raise SystemExit("error: --victim and --pool are required (or --merge)")
    seeds = args.seed or [0]
    from models.params import UserError
    from stages.training import loop as _loop

    try:
        args.device = _loop.pick_device(args.device)  # steal's check: a CUDA device asked for must be there
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        import art  # noqa: F401

        have_art = not args.no_art
    except ImportError:
        have_art = False
        console.print("ART not installed (pip install -e '.[calibration]'): our thief only")
    recipe = dict(optimizer=args.ours_optimizer, schedule=args.ours_schedule, lr=args.ours_lr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for victim in args.victim:
            for pool in args.pool:
                for label in args.label or ["soft", "hard"]:
                    for seed in seeds:
                        row = {"victim": str(victim), "pool": str(pool), "label": label, "seed": seed}
                        cell = (victim, pool, label, args.budget, args.epochs, seed)  # what every thief here takes
                        started = time.time()
                        row["ours"], ours_params = ours(*cell, args.ours_param, folder, recipe, args.device)
                        row["ours_seconds"] = time.time() - started
                        if have_art:
                            started = time.time()
                            row["art"] = art_thief(*cell, args.art_optimizer, args.art_lr, args.device)
                            row["art_seconds"] = time.time() - started
                        if have_art and args.shared_queries:
                            row["ours_shared"], row["art_shared"] = shared_queries(*cell)
                        rows.append(row)
                        console.print(row)
    seeds_text = ", ".join(map(str, seeds))
    console.print(
        table(rows, f"knockoff calibration: {args.budget:,} queries, {args.epochs} epochs, seeds {seeds_text}")
    )
    if args.json:
        args.json.write_text(json.dumps(record(args, seeds, ours_params, have_art, rows), indent=1))


if __name__ == "__main__":
    main()

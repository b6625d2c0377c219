"""Calibrate our KnockoffNets against an independent implementation: the Adversarial Robustness Toolbox's
KnockoffNets (random strategy) with the same LeNet-5 thief, budget, pool and epochs, side by side per cell.

    python benchmarks/calibrate_knockoff.py --victim V.h5 [--victim W.h5] --pool P.h5 [--pool Q.h5] \
        --budget 18000 --epochs 30 [--label soft --label hard] [--ours-param KEY=VALUE ...] [--json out.json]

Each cell (victim x pool x label) trains our surrogate through `steal` and ART's through `KnockoffNets.extract`
against the same deployed graph (images in [0, 1] -> probabilities), and scores both on the victim's test split.
ART is an optional extra (`pip install -e '.[calibration]'`); without it only our thief runs.
"""

from __future__ import annotations

import argparse
import json
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
) -> float:
    from stages import steal

    out = folder / f"ours-{victim.stem}-{pool.stem}-{label}.h5"
    steal.run(
        victim=victim,
        pool=str(pool),
        label=label,
        budget=budget,
        epochs=epochs,
        seed=seed,
        device="cpu",
        attack_param=params or None,
        out=out,
        **recipe,
    )
    with h5py.File(out, "r") as f:
        return float(f.attrs["stealing_accuracy"])


def art_thief(
    victim: Path, pool: Path, label: str, budget: int, epochs: int, seed: int, optimizer: str, lr: float
) -> float:
    """ART's KnockoffNets: constant learning rate, no schedule, soft targets through torch's cross-entropy."""
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification import PyTorchClassifier

    import models
    from stages import _blackbox, _data

    graph, info = _blackbox.open_victim(victim, "cpu")
    data = _data.load(info.dataset_path if Path(info.dataset_path).exists() else info.dataset)
    shape, classes = tuple(data.shape), data.num_classes
    victim_art = PyTorchClassifier(
        model=graph, loss=torch.nn.CrossEntropyLoss(), input_shape=shape, nb_classes=classes, clip_values=(0.0, 1.0)
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
    )
    pool_x = _data.fit_images(_data.load(str(pool), splits=("train",)).splits["train"][0], data.shape)
    pool_x = pool_x.float().div(255).numpy()
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
    stolen = attack.extract(pool_x, thieved_classifier=thief)
    test_x, test_y = data.splits["test"]
    predictions = stolen.predict(test_x.float().div(255).numpy(), batch_size=1000).argmax(1)
    return float((predictions == test_y.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", type=Path, action="append", required=True)
    parser.add_argument("--pool", type=Path, action="append", required=True)
    parser.add_argument("--label", action="append", choices=("soft", "hard"))
    parser.add_argument("--budget", type=int, default=18_000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours-param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ours-optimizer", choices=("sgd", "adam"), help="default: steal's for knockoff")
    parser.add_argument("--ours-schedule", choices=("cosine", "constant"), help="default: steal's for knockoff")
    parser.add_argument("--ours-lr", type=float, help="default: steal's for the optimizer")
    parser.add_argument("--art-optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--art-lr", type=float, default=1e-3)
    parser.add_argument("--no-art", action="store_true", help="run our thief only")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--keep", type=Path, help="keep our surrogates (with their transfer sets) in this folder")
    args = parser.parse_args()
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
                    row = {"victim": str(victim), "pool": str(pool), "label": label}
                    started = time.time()
                    row["ours"] = ours(
                        victim, pool, label, args.budget, args.epochs, args.seed, args.ours_param, folder, recipe
                    )
                    row["ours_seconds"] = time.time() - started
                    if have_art:
                        started = time.time()
                        row["art"] = art_thief(
                            victim, pool, label, args.budget, args.epochs, args.seed, args.art_optimizer, args.art_lr
                        )
                        row["art_seconds"] = time.time() - started
                    rows.append(row)
                    console.print(row)
    table = Table(
        title=f"knockoff calibration: {args.budget:,} queries, {args.epochs} epochs, seed {args.seed}",
        title_justify="left",
    )
    for column in ("victim", "pool", "label", "ours", "ART", "ours - ART"):
        table.add_column(column)
    for r in rows:
        art_acc = r.get("art")
        table.add_row(
            Path(r["victim"]).stem,
            Path(r["pool"]).stem,
            r["label"],
            f"{100 * r['ours']:.1f}",
            "" if art_acc is None else f"{100 * art_acc:.1f}",
            "" if art_acc is None else f"{100 * (r['ours'] - art_acc):+.1f}",
        )
    console.print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "params": vars(args)
                    | {
                        "victim": [str(v) for v in args.victim],
                        "pool": [str(p) for p in args.pool],
                        "json": str(args.json),
                        "keep": str(args.keep),
                    },
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

"""Extraction alerts against real thieves: serve each victim, steal it over HTTP with every attack (alerts only log),
and read from the ledger the queries until each thief's first alert; the stealing accuracy it had then is that of a
surrogate trained with its recipe on its first that-many answers. Benign clients (the test split replayed, and a
client sending each image twice plus shifted, noisy copies) measure the false alerts.

    python experiments/serve_alerts.py --victim undefended=v.h5 --victim broad=ini.h5 --data mnist.h5 \\
        --pool digits=sklearn-digits.h5 --pool fashion=fashionmnist.h5 --out artifacts/serve-alerts [--smoke]

Prints a Markdown table on stdout and writes `alerts.json` and every surrogate and ledger under --out. All
traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from stages import serve_key  # noqa: E402
from stages.attacks import blackbox as _blackbox  # noqa: E402
from stages.attacks._thief import SurrogateRecipe  # noqa: E402
from stages.core.artifacts import attr_json, open_artifact  # noqa: E402
from stages.data import prepared as _data  # noqa: E402
from stages.evaluation import budget_curve as _budget_curve  # noqa: E402
from stages.serving.launch import launch  # noqa: E402

# (name, attack, pool, label, flags): the attacks of the grid, budgets sized to run in minutes on two cores; the pool
# attacks train budget-curve surrogates too, so `evaluate` on the outputs reads their queries to accuracy
ATTACKS = [
    (
        "knockoff-soft-digits",
        "knockoff",
        "digits",
        "soft",
        ["--budget", "5000", "--epochs", "10", "--budget-curve", "6"],
    ),
    (
        "knockoff-soft-fashion",
        "knockoff",
        "fashion",
        "soft",
        ["--budget", "5000", "--epochs", "10", "--budget-curve", "6"],
    ),
    (
        "knockoff-hard-digits",
        "knockoff",
        "digits",
        "hard",
        ["--budget", "5000", "--epochs", "10", "--budget-curve", "6"],
    ),
    ("jbda", "jbda", "digits", "soft", ["--budget", "4650", "--epochs", "5", "--attack-param", "rounds=5"]),
    (
        "dfme",
        "dfme",
        None,
        "soft",
        ["--budget", "5000", "--epochs", "5", "--batch-size", "64", "--attack-param", "width=16"],
    ),
    ("adaptive-digits", "adaptive", "digits", "hard", ["--budget", "5000", "--epochs", "10", "--budget-curve", "6"]),
]


def smoke(flags: list[str]) -> list[str]:
    """300 queries, one epoch."""
    out = list(flags)
    for option, value in (("--budget", "300"), ("--epochs", "1")):
        out[out.index(option) + 1] = value
    return out


def start(victim: Path, keys: Path, ledger: Path, data: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """serve calibrated on `data`, with `flags`; its log beside the ledger, a one-line exit if it does not start."""
    try:
        return launch(
            victim,
            keys,
            ledger,
            "--calibration-data",
            str(data),
            *flags,
            stderr=open(ledger.with_suffix(".log"), "w"),
            timeout=300,
        )
    except RuntimeError:
        raise SystemExit(f"serve did not start; see {ledger.with_suffix('.log')}") from None


def send(url: str, key: str, images: np.ndarray, batch: int = 100) -> int:
    with httpx.Client(base_url=url, headers={"X-API-Key": key, "Content-Type": "application/x-npy"}, timeout=60) as c:
        for start in range(0, len(images), batch):
            buffer = io.BytesIO()
            np.save(buffer, images[start : start + batch])
            c.post("/v1/predict", content=buffer.getvalue()).raise_for_status()
    return len(images)


def augmented(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each image as sent, again unchanged, and a copy shifted by up to 2 pixels with mild noise: a benign client
    that retries and augments (a test-time augmentation user)."""
    rng = np.random.default_rng(seed)
    shifted = np.stack([np.roll(x, tuple(rng.integers(-2, 3, 2)), axis=(1, 2)) for x in images])
    noisy = np.clip(shifted.astype(np.int16) + rng.integers(-12, 13, shifted.shape), 0, 255).astype(np.uint8)
    return np.stack([images, images, noisy], 1).reshape(-1, *images.shape[1:])


def firsts(alerts: list[dict]) -> dict[str, int]:
    """Queries at the first alert of each signal, earliest first."""
    out: dict[str, int] = {}
    for a in sorted(alerts, key=lambda a: a["queries"]):
        out.setdefault(a["signal"], a["queries"])
    return out


def alerts_of(ledger: Path, name: str) -> list[dict]:
    with sqlite3.connect(ledger) as db:
        rows = db.execute(
            "SELECT signal, value, threshold, queries FROM alerts WHERE principal = ? ORDER BY id", (name,)
        ).fetchall()
    return [dict(signal=s, value=v, threshold=t, queries=q) for s, v, t, q in rows]


def accuracy_at(surrogate: Path, queries: int, data: _data.Dataset) -> float:
    """Stealing accuracy of a surrogate trained with the thief's recipe on its first `queries` answers (none: the
    surrogate as initialised)."""
    with open_artifact(surrogate, "surrogate") as f:
        params, attack, label = attr_json(f, "params"), str(f.attrs["attack"]), str(f.attrs["label"])
        classes, shape = attr_json(f, "classes"), tuple(int(v) for v in f.attrs["input_shape"])
        mean, std = [float(v) for v in f.attrs["mean"]], [float(v) for v in f.attrs["std"]]
        if queries >= int(f.attrs["queries"]):
            return float(f.attrs["stealing_accuracy"])
        recipe = SurrogateRecipe(
            epochs=int(params["epochs"]),
            batch_size=int(params["batch_size"]),
            lr=float(params["lr"]),
            momentum=float(params["momentum"]),
            weight_decay=float(params["weight_decay"]),
            optimizer=params.get("optimizer", "sgd"),
            schedule=params.get("schedule", "cosine"),
        )

        def build():
            torch.manual_seed(int(params["seed"]))
            return models.build_model(str(params["arch"]), len(classes), shape[0], shape[1], mean, std)

        x, y = _data.to_float(data.splits["test"][0]), data.splits["test"][1]
        if queries == 0:  # nothing to train on: the surrogate as initialised
            return float((_blackbox.predict(build().eval(), x, "cpu").argmax(1).cpu() == y).float().mean())
        curve = _budget_curve.measure(
            f["transfer/images"],
            f["transfer/answers"],
            label,
            attack,
            [queries],
            build,
            recipe,
            len(classes),
            shape,
            int(params["seed"]),
            "cpu",
            x,
            y,
            lambda _: None,
        )
    return curve["stealing_accuracy"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", action="append", required=True, help="NAME=victim.h5 (repeatable)")
    parser.add_argument("--data", type=Path, required=True, help="the victims' prepared dataset")
    parser.add_argument("--pool", action="append", required=True, help="NAME=pool.h5 (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/serve-alerts"))
    parser.add_argument("--smoke", action="store_true", help="300-query thieves, 1,000 benign images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pools = dict(p.split("=", 1) for p in args.pool)
    data = _data.load(args.data, splits=("test",))
    test = data.splits["test"][0].numpy()[: 1000 if args.smoke else None]
    results = []
    for name, path in (v.split("=", 1) for v in args.victim):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        keys, ledger = folder / "keys.toml", folder / "ledger.sqlite"
        for stale in (keys, ledger, ledger.with_suffix(".alerts.jsonl")):
            stale.unlink(missing_ok=True)
        tokens = {
            p: serve_key.run(p, keys, budget=10**9, rate=1e6, burst=1e6, action="log")
            for p in ["benign", "benign-augmented"] + [a[0] for a in ATTACKS]
        }
        proc, url = start(Path(path), keys, ledger, args.data)
        try:
            benign = {
                "benign": send(url, tokens["benign"], test),
                "benign-augmented": send(url, tokens["benign-augmented"], augmented(test[: len(test) // 2])),
            }
            for client, images in benign.items():
                found = alerts_of(ledger, client)
                results.append(
                    dict(
                        victim=name,
                        client=client,
                        images=images,
                        alerts=len(found),
                        first=found[0] if found else None,
                        first_by_signal=firsts(found),
                    )
                )
                print(f"{name} {client}: {images} images, {len(found)} alerts", file=sys.stderr, flush=True)
            for thief, attack, pool, label, flags in ATTACKS:
                out = folder / f"{thief}.h5"
                command = [
                    sys.executable,
                    str(ROOT / "cli.py"),
                    "steal",
                    "--target",
                    url,
                    "--victim",
                    path,
                    "--attack",
                    attack,
                    "--label",
                    label,
                    "--data",
                    str(args.data),
                    "--device",
                    "cpu",
                    "--out",
                    str(out),
                    *(["--pool", pools[pool]] if pool else []),
                    *(smoke(flags) if args.smoke else flags),
                ]
                subprocess.run(
                    command,
                    check=True,
                    env={**os.environ, "INI_API_KEY": tokens[thief], "OMP_NUM_THREADS": "1"},
                    stdout=subprocess.DEVNULL,
                    stderr=open(folder / f"{thief}.log", "w"),
                )
                found = alerts_of(ledger, thief)
                with open_artifact(out, "surrogate") as f:
                    final, spent = float(f.attrs["stealing_accuracy"]), int(f.attrs["queries"])
                    benign_accuracy = float(f.attrs["victim_accuracy"])
                first = found[0] if found else None
                at_alert = accuracy_at(out, first["queries"], data) if first else None
                results.append(
                    dict(
                        victim=name,
                        client=thief,
                        images=spent,
                        alerts=len(found),
                        first=first,
                        first_by_signal=firsts(found),
                        stealing_at_alert=at_alert,
                        stealing_final=final,
                        benign_accuracy=benign_accuracy,
                    )
                )
                print(
                    f"{name} {thief}: first alert {first}, at alert {at_alert}, final {final:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    (args.out / "alerts.json").write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: list[dict]) -> str:
    lines = [
        "| victim | client | queries sent | alerts | first alert of each signal (at queries) | stealing accuracy at "
        "first alert | stealing accuracy at full budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        first = ", ".join(f"{signal} {queries:,}" for signal, queries in r["first_by_signal"].items()) or "none"
        at = f"{100 * r['stealing_at_alert']:.1f} %" if r.get("stealing_at_alert") is not None else "-"
        final = f"{100 * r['stealing_final']:.1f} %" if "stealing_final" in r else "-"
        lines.append(f"| {r['victim']} | {r['client']} | {r['images']:,} | {r['alerts']} | {first} | {at} | {final} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Monitor-aware thieves against `serve` with every alert blocking (per key and global): knockoff over one key, over
many keys each below --min-images (sybil), and with benign-looking filler (mix); the theft each reaches before the
first alert and before the block, beside the same thief with the monitor off (the victim file queried directly).
Benign clients (the test split replayed, an augmented replay of each half of it, a class-imbalanced client with and
without its declared prior) share one server and measure the false alerts.

    python experiments/serve_watch.py --victim undefended=v.h5 --victim near=ini.h5 --data mnist.h5 \\
        --pool near=latin-letters.h5 --pool far=fashionmnist.h5 --out artifacts/serve-watch [--smoke]

Prints a Markdown table on stdout and writes `watch.json`, every surrogate and ledger under --out. All traffic goes
to 127.0.0.1.
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
import serve_alerts  # noqa: E402
import torch  # noqa: E402
from serve_alerts import accuracy_at, augmented  # noqa: E402

from stages import serve_key  # noqa: E402
from stages.core.artifacts import open_artifact  # noqa: E402
from stages.data import prepared as _data  # noqa: E402

# (name, pool, keys, label, moves): the thieves, knockoff with soft or hard labels from a pool near the victim's data
# (a digit victim: the Latin letters) or far from it; each runs against a fresh server and ledger, after benign
# background traffic (BACKGROUND test images over one key, and YOUNG keys of YOUNG_IMAGES test images each, below
# --min-images) so the global window does not hold the thief alone
# a Sybil thief asks one key's worth of real queries per call (--query-batch), so a block costs it one call's answers
SYBIL = ["--target-move", "sybil=49", "--query-batch", "49"]
MIX = ["--target-move", "sybil=49", "--target-move", "mix=0.5", "--query-batch", "24"]
THIEVES = [
    ("plain", "near", 1, "soft", []),
    ("plain", "near", 1, "hard", []),
    ("sybil", "near", 60, "soft", SYBIL),
    ("sybil", "near", 60, "hard", SYBIL),
    ("sybil-mix", "near", 120, "soft", MIX),
    ("plain", "far", 1, "soft", []),
    ("sybil", "far", 60, "soft", SYBIL),
]
SERVE_FLAGS = ["--global-action", "block"]
BACKGROUND, YOUNG, YOUNG_IMAGES = 5000, 20, 25


def start(victim: Path, keys: Path, ledger: Path, data: Path):
    for stale in (ledger, ledger.with_suffix(".alerts.jsonl")):
        stale.unlink(missing_ok=True)
    return serve_alerts.start(victim, keys, ledger, data, *SERVE_FLAGS)


def replay(url: str, key: str, images: np.ndarray, batch: int = 100) -> tuple[int, int]:
    """(images answered, images refused) until the end or a 403."""
    answered = 0
    with httpx.Client(base_url=url, headers={"X-API-Key": key, "Content-Type": "application/x-npy"}, timeout=60) as c:
        for at in range(0, len(images), batch):
            buffer = io.BytesIO()
            np.save(buffer, images[at : at + batch])
            r = c.post("/v1/predict", content=buffer.getvalue())
            if r.status_code == 403:
                return answered, len(images) - answered
            r.raise_for_status()
            answered += len(r.json()["answers"])
    return answered, 0


def ledger_alerts(ledger: Path) -> list[dict]:
    with sqlite3.connect(ledger) as db:
        rows = db.execute("SELECT principal, time, signal, queries, action FROM alerts ORDER BY id").fetchall()
    return [dict(principal=p, time=t, signal=s, queries=q, action=a) for p, t, s, q, a in rows]


def answered_before(ledger: Path, names: list[str], moment: float) -> int:
    with sqlite3.connect(ledger) as db:
        marks = ",".join("?" * len(names))
        row = db.execute(
            f"SELECT COALESCE(SUM(images), 0) FROM queries WHERE principal IN ({marks}) AND time < ?", (*names, moment)
        ).fetchone()
    return int(row[0])


def benign_clients(args, name: str, path: str, folder: Path, test, labels, data, results: list) -> None:
    """The benign clients on one server: the test split replayed, an augmented replay of each half of it (two
    keys), and a client of 1s and 7s without and with its declared prior (and a train-split replay with
    --train-replay)."""
    imbalanced = test[np.isin(labels, (1, 7))]
    shares = np.bincount(labels[np.isin(labels, (1, 7))], minlength=10) / len(imbalanced)
    prior = ",".join(f"{v:.4f}" for v in shares)
    keys = folder / "benign-keys.toml"
    keys.unlink(missing_ok=True)
    benign = {
        "benign": (test, None),
        "benign-augmented": (augmented(test[: len(test) // 2]), None),
        "benign-augmented-2": (augmented(test[len(test) // 2 :], seed=1), None),
        "imbalanced": (imbalanced, None),
        "imbalanced-declared": (imbalanced, prior),
    }
    if args.train_replay:
        benign["train-replay"] = (data.splits["train"][0].numpy()[: args.train_replay], None)
    # `log`: a benign client goes on after a false alert, so every false alert over its whole replay is counted
    tokens = {client: serve_key.run(client, keys, 10**9, 1e6, 1e6, "log", p) for client, (_, p) in benign.items()}
    ledger = folder / "benign.sqlite"
    proc, url = start(Path(path), keys, ledger, args.data)
    try:
        sent = {client: replay(url, tokens[client], images) for client, (images, _) in benign.items()}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    found = ledger_alerts(ledger)
    for client, (answered, refused) in sent.items():
        own = [a for a in found if a["principal"] == client]
        results.append(
            dict(
                victim=name,
                client=client,
                images=answered,
                refused=refused,
                alerts=len(own),
                signals=sorted({a["signal"] for a in own}),
                first=own[0] if own else None,
            )
        )
    results.append(
        dict(victim=name, client="global (all benign keys)", global_alerts=[a for a in found if a["principal"] == "*"])
    )
    print(f"{name} benign: {results[-len(benign) - 1 :]}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", action="append", required=True, help="NAME=victim.h5 (repeatable)")
    parser.add_argument("--data", type=Path, required=True, help="the victims' prepared dataset")
    parser.add_argument("--pool", action="append", required=True, help="NAME=pool.h5 (repeatable)")
    parser.add_argument("--budget", type=int, default=2000, help="queries per thief (filler included)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("artifacts/serve-watch"))
    parser.add_argument("--smoke", action="store_true", help="300-query thieves, 1,000 benign images")
    parser.add_argument("--benign-only", action="store_true", help="only the benign clients")
    parser.add_argument("--skip-benign", action="store_true", help="only the thieves")
    parser.add_argument("--thieves", help="comma-separated thief labels to run (e.g. sybil-hard-near) [default: all]")
    parser.add_argument(
        "--train-replay", type=int, default=0, help="also replay this many train-split images as one more benign client"
    )
    args = parser.parse_args()
    args.out, args.data = args.out.resolve(), args.data.resolve()  # the server runs from the repository root
    torch.set_num_threads(1)
    budget, epochs = (300, 1) if args.smoke else (args.budget, args.epochs)
    pools = {k: str(Path(v).resolve()) for k, v in (p.split("=", 1) for p in args.pool)}
    data = _data.load(args.data, splits=("test", "train") if args.train_replay else ("test",))
    test, labels = data.splits["test"][0].numpy(), data.splits["test"][1].numpy()
    if args.smoke:
        test, labels = test[:1000], labels[:1000]
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name, path in (v.split("=", 1) for v in args.victim):
        path = str(Path(path).resolve())
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        if not args.skip_benign:
            benign_clients(args, name, path, folder, test, labels, data, results)
        if args.benign_only:
            continue
        steal = [sys.executable, str(ROOT / "cli.py"), "steal", "--attack", "knockoff"]
        common = ["--data", str(args.data), "--device", "cpu", "--epochs", str(epochs), "--victim", path]
        wanted = args.thieves.split(",") if args.thieves else None
        for answers, pool in sorted({(a, p) for _, p, _, a, _ in THIEVES}):
            off_label = f"{answers}-{pool}"
            out = folder / f"off-{off_label}.h5"
            if wanted and not any(t.endswith(f"-{off_label}") for t in wanted):
                continue
            subprocess.run(
                [*steal, *common, "--label", answers, "--pool", pools[pool], "--budget", str(budget)]
                + ["--out", str(out)],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(folder / f"off-{off_label}.log", "w"),
            )
            with open_artifact(out, "surrogate") as f:
                off = float(f.attrs["stealing_accuracy"])
            results.append(dict(victim=name, client=f"monitor off, {off_label}", images=budget, stealing_final=off))
        for thief, pool, n_keys, answers, moves in THIEVES:
            label = f"{thief}-{answers}-{pool}"
            if wanted and label not in wanted:
                continue
            moves = ["--label", answers, *moves]
            keys = folder / f"{label}-keys.toml"
            keys.unlink(missing_ok=True)
            names = [f"{label}-{i}" for i in range(n_keys)]
            secret = ",".join(serve_key.run(k, keys, 10**9, 1e6, 1e6, "block") for k in names)
            background = {
                k: serve_key.run(k, keys, 10**9, 1e6, 1e6, "block")
                for k in ["background"] + [f"young-{i}" for i in range(YOUNG)]
            }
            ledger = folder / f"{label}.sqlite"
            out = folder / f"{label}.h5"
            proc, url = start(Path(path), keys, ledger, args.data)
            try:
                replay(url, background["background"], test[-BACKGROUND:])
                for i in range(YOUNG):
                    replay(url, background[f"young-{i}"], test[i * YOUNG_IMAGES : (i + 1) * YOUNG_IMAGES])
                run = subprocess.run(
                    [
                        *steal,
                        *common,
                        "--target",
                        url,
                        "--pool",
                        pools[pool],
                        "--budget",
                        str(budget),
                        "--out",
                        str(out),
                        *moves,
                    ],
                    env={**env, "INI_API_KEY": secret},
                    stdout=subprocess.DEVNULL,
                    stderr=open(folder / f"{label}.log", "w"),
                )
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            every = ledger_alerts(ledger)
            found = [a for a in every if a["principal"] in names or a["principal"] == "*"]
            row = dict(victim=name, client=label, moves=moves, keys=n_keys, alerts=len(found))
            row["background_alerts"] = [a for a in every if a["principal"] in background]
            if run.returncode != 0 or not out.exists():
                row["error"] = f"steal exited {run.returncode}"
                results.append(row)
                continue
            with open_artifact(out, "surrogate") as f:
                received, final = int(f.attrs["queries"]), float(f.attrs["stealing_accuracy"])
            with sqlite3.connect(ledger) as db:
                spent = db.execute("SELECT COALESCE(SUM(spent), 0) FROM principals").fetchone()[0]
                blocked = db.execute("SELECT COUNT(*) FROM principals WHERE state = 'blocked'").fetchone()[0]
                used = db.execute("SELECT COUNT(*) FROM principals WHERE spent > 0").fetchone()[0]
            first = found[0] if found else None
            before = min(received, answered_before(ledger, names, first["time"])) if first else received
            row.update(
                images=received,
                spent=int(spent),
                keys_used=int(used),
                keys_blocked=int(blocked),
                first=first,
                signals=sorted({a["signal"] for a in found}),
                received_before_alert=before,
                stealing_at_alert=accuracy_at(out, before, data) if first and before > 0 else None,
                stealing_final=final,
            )
            results.append(row)
            print(f"{name} {label}: {row}", file=sys.stderr, flush=True)
            (args.out / "watch.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "watch.json").write_text(json.dumps(results, indent=1, default=str))
    print(table(results))


def table(results: list[dict]) -> str:
    lines = [
        "| victim | client | keys (used / blocked) | answers received | spent (filler, withheld) | alerts: signals "
        "| first alert at (answers received) | stealing at first alert | stealing before block (final) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "global_alerts" in r:
            signals = sorted({a["signal"] for a in r["global_alerts"]})
            lines.append(
                f"| {r['victim']} | {r['client']} | - | - | - | {len(r['global_alerts'])}: "
                f"{', '.join(signals) or 'none'} | - | - | - |"
            )
            continue
        keys = f"{r.get('keys_used', '-')} / {r.get('keys_blocked', '-')}" if "keys" in r else "1"
        first = r.get("first")
        at = f"{first['signal']} ({r.get('received_before_alert', first['queries']):,})" if first else "none"
        steal_at = f"{100 * r['stealing_at_alert']:.1f} %" if r.get("stealing_at_alert") is not None else "-"
        final = f"{100 * r['stealing_final']:.1f} %" if "stealing_final" in r else "-"
        images = f"{r['images']:,}" if "images" in r else r.get("error", "-")
        lines.append(
            f"| {r['victim']} | {r['client']} | {keys} | {images} | {r.get('spent', '-')} | {r.get('alerts', '-')}: "
            f"{', '.join(r.get('signals', [])) or 'none'} | {at} | {steal_at} | {final} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Monitor-aware thieves against `serve` with every alert blocking (per key and global): knockoff, seeded, JBDA and
DFME over one key, over many keys each below --min-images (sybil), and with benign-looking filler (mix), and a
knockoff thief under the volume rate (paced, with and without filler); the theft each reaches before the first alert
and before the block, beside the same thief with the monitor off (the victim file queried directly), and the
queries and keys each needs to reach 50 % and 80 % of its monitor-off theft. Benign clients (the test split
replayed, an augmented replay of each half of it, a class-imbalanced client with and without its declared prior)
share one server and measure the false alerts.

    python experiments/serve_watch.py --victim undefended=v.h5 --victim near=ini.h5 --data mnist.h5 \\
        --pool near=latin-letters.h5 --pool far=fashionmnist.h5 --out artifacts/serve-watch [--seed 1 ...] [--smoke]

Prints Markdown tables on stdout (every run, then each thief over its seeds) and writes `watch.json`, every
surrogate and ledger under --out; a later run into the same --out replaces the rows it measures again and keeps the
others. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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

# The thieves, one row each: the attack, the role of the pool it queries (near the victim's data: for a digit victim,
# the Latin letters; far from it; None: jbda grows its set from 150 digits of the victim's train split it holds,
# dfme queries its generator's images), the keys it holds, the answers it asks for, and its move. Each runs against
# a fresh server and ledger, after benign background traffic (BACKGROUND test images over one key, and YOUNG keys of
# YOUNG_IMAGES test images each, below --min-images) so the global window does not hold the thief alone.
# A Sybil thief asks one key's worth of real queries per call (--query-batch), so a block costs it one call's
# answers. A paced thief sends PACE images a second, under the default volume window (10,000 images an hour per
# key), in calls of 50 images (filler included), so no call waits long for its share of the rate.
PACE = 2.5
MOVES = {
    "plain": [],
    "sybil": ["--target-move", "sybil=49", "--query-batch", "49"],
    "sybil-mix": ["--target-move", "sybil=49", "--target-move", "mix=0.5", "--query-batch", "24"],
    "paced": ["--target-move", f"paced={PACE}", "--query-batch", "50"],
    "paced-mix": ["--target-move", f"paced={PACE}", "--target-move", "mix=0.5", "--query-batch", "25"],
}
# DFME's recipe from the serve_alerts grid: smaller generator steps, so a 2,000-query budget makes more of them
ATTACK_FLAGS = {"dfme": ["--batch-size", "64", "--attack-param", "width=16"]}


@dataclass(frozen=True)
class Thief:
    move: str
    attack: str = "knockoff"
    pool: Optional[str] = "near"
    keys: int = 1
    label: str = "soft"
    params: tuple[str, ...] = ()  # the attack's --attack-param values

    @property
    def off(self) -> str:
        """The monitor-off thief's name: the same attack, answers, pool and parameters, no move."""
        return "-".join(
            ([] if self.attack == "knockoff" else [self.attack])
            + [self.label]
            + ([self.pool] if self.pool else [])
            + [p.replace("=", "").replace(".", "_") for p in self.params]  # no dot: names become file stems
        )

    @property
    def name(self) -> str:
        return f"{self.move}-{self.off}"

    def steal(self, pools: dict[str, str], budget: int, epochs: int, seed: int, monitor: bool = True) -> list[str]:
        """`steal`'s flags for this thief (without --victim, --data, --target and --out); with monitor=False, the
        same thief without its move, as it queries the victim file."""
        pool = ["--pool", pools[self.pool]] if self.pool else []
        flags = ["--attack", self.attack, "--label", self.label, *pool, "--budget", str(budget)]
        flags += ["--epochs", str(epochs), "--seed", str(seed), *ATTACK_FLAGS.get(self.attack, [])]
        flags += [flag for p in self.params for flag in ("--attack-param", p)]
        return flags + (MOVES[self.move] if monitor else [])


KNOCKOFF = [
    Thief("plain"),
    Thief("plain", label="hard"),
    Thief("sybil", keys=60),
    Thief("sybil", keys=60, label="hard"),
    Thief("sybil-mix", keys=120),
    Thief("plain", pool="far"),
    Thief("sybil", pool="far", keys=60),
]
OTHERS = [
    Thief(move, attack, pool, keys)
    for attack, pool in (("seeded", "near"), ("jbda", None), ("dfme", None))
    for move, keys in (("plain", 1), ("sybil", 60), ("sybil-mix", 120))
]
PACED = [Thief("paced"), Thief("paced-mix")]
# JBDA that knows the step radius: sign steps of lambda 0.3, whose children lie about 6 in L2 from their parents on
# MNIST, as far as a benign query from its nearest (the radii are 1.3-4.0)
WIDE = [Thief(move, "jbda", None, keys, params=("step=0.3",)) for move, keys in (("plain", 1), ("sybil", 60))]
# and that knows the sign-step test: each pixel's step scaled by a draw in [0.8, 1.2], so no single magnitude
WIDE += [
    Thief(move, "jbda", None, keys, params=("step=0.3", "jitter=0.2")) for move, keys in (("plain", 1), ("sybil", 60))
]
# and that would meet a test of the share of pixels a step changes: only the 30 % of largest gradient are stepped
# (at lambda 0.3 those steps fall under the radius again, so also at lambda 0.5)
WIDE += [
    Thief(move, "jbda", None, keys, params=(f"step={step}", "jitter=0.2", "sparse=0.3"))
    for step in (0.3, 0.5)
    for move, keys in (("plain", 1), ("sybil", 60))
]
THIEVES = KNOCKOFF + OTHERS + PACED + WIDE
SERVE_FLAGS = ["--global-action", "block"]
BACKGROUND, YOUNG, YOUNG_IMAGES = 5000, 20, 25
SHARES = (0.5, 0.8)  # of the monitor-off theft: the points the goal reads
# a monitor-off thief less than a point above its untrained surrogate stole nothing: the untrained LeNet-5 alone
# moves by 2.5 points over seeds 0-2 (8.99-11.52 % on the MNIST test split)
NO_THEFT = 0.01


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


# A crowd: many young keys, each sending a few images and never judged on its own, the traffic the cohort signals
# read. CROWD_IMAGES is a multiple of 3, so each image of the augmented crowd and its copies reach one key.
CROWD_IMAGES = 24


def benign_clients(args, name: str, path: str, folder: Path, test, labels, data, results: list) -> None:
    """The benign clients on one server: the test split replayed, an augmented replay of each half of it (two
    keys), a client of 1s and 7s without and with its declared prior (and a train-split replay with
    --train-replay); then two crowds of young keys of CROWD_IMAGES images each: the first half of the test split,
    and an augmented replay of the second half."""
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
    half = len(test) // 2
    crowds = {"crowd": test[:half], "crowd-augmented": augmented(test[half:], seed=2)}
    members = {crowd: [f"{crowd}-{i}" for i in range(0, len(images), CROWD_IMAGES)] for crowd, images in crowds.items()}
    tokens |= {k: serve_key.run(k, keys, 10**9, 1e6, 1e6, "log") for names in members.values() for k in names}
    ledger = folder / "benign.sqlite"
    proc, url = start(Path(path), keys, ledger, args.data)
    try:
        sent = {client: replay(url, tokens[client], images) for client, (images, _) in benign.items()}
        for crowd, images in crowds.items():
            parts = [
                replay(url, tokens[k], images[i * CROWD_IMAGES : (i + 1) * CROWD_IMAGES])
                for i, k in enumerate(members[crowd])
            ]
            sent[crowd] = (sum(p[0] for p in parts), sum(p[1] for p in parts))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    found = ledger_alerts(ledger)
    for client, (answered, refused) in sent.items():
        own = [a for a in found if a["principal"] in members.get(client, [client])]
        results.append(
            dict(
                victim=name,
                client=client,
                **({"keys": len(members[client]), "keys_used": len(members[client])} if client in members else {}),
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
    print(f"{name} benign: {results[-len(sent) - 1 :]}", file=sys.stderr, flush=True)


def spent_until(ledger: Path, names: list[str], answers: int, mix: float) -> dict:
    """The images the thief's keys were answered (filler included) and the keys it had used when its real answers
    first numbered `answers`; a request of r real queries carries r * mix / (1 - mix) filler."""
    with sqlite3.connect(ledger) as db:
        marks = ",".join("?" * len(names))
        rows = db.execute(
            f"SELECT principal, images FROM queries WHERE principal IN ({marks}) ORDER BY id", names
        ).fetchall()
    real, images, used = 0.0, 0, set()
    for principal, n in rows:
        if real >= answers:
            break
        real, images = real + n * (1 - mix), images + n
        used.add(principal)
    return dict(queries=images, keys=len(used))


def theft_curve(out: Path, received: int, final: float, data, known: Optional[tuple] = None) -> list[tuple]:
    """(answers, stealing accuracy), fewest answers first: the thief's recipe retrained on its first 49 x 2^k
    answers, its own surrogate on all of them, and `known` (the point at its first alert). A retrained point can
    beat the thief's own surrogate: JBDA blocked in the middle of a round keeps the surrogate of the round before."""
    points = [(n, accuracy_at(out, n, data)) for n in (49, 98, 196, 392, 784, 1568) if n < received]
    return sorted(points + [(received, final)] + ([known] if known else []))


def first_reaching(curve: list[tuple], target: float) -> Optional[int]:
    return next((n for n, accuracy in curve if accuracy >= target), None)


def steal_quietly(command: list[str], log: Path, env: dict) -> subprocess.CompletedProcess:
    with open(log, "w") as err:
        return subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=err)


def monitor_off(thief: Thief, seed: int, name: str, folder: Path, steal: list[str], flags: dict, data) -> dict:
    """The thief querying the victim file, and the answers it needs for each share of its theft (its recipe
    retrained on its first answers)."""
    stem = folder / f"off-{thief.off}-s{seed}"
    run = steal_quietly(
        [*steal, *thief.steal(**flags, seed=seed, monitor=False), "--out", str(stem.with_suffix(".h5"))],
        stem.with_suffix(".log"),
        flags_env(),
    )
    if run.returncode != 0:
        sys.exit(f"the monitor-off {thief.off} thief exited {run.returncode}: see {stem.with_suffix('.log')}")
    out = stem.with_suffix(".h5")
    with open_artifact(out, "surrogate") as f:
        received, off = int(f.attrs["queries"]), float(f.attrs["stealing_accuracy"])
    row = dict(victim=name, client=f"monitor off, {thief.off}", seed=seed, images=received, stealing_final=off)
    row["untrained"] = accuracy_at(out, 0, data)  # the same surrogate as initialised: no theft
    goals = {f"{share:.0%}": goal(off, row["untrained"], share) for share in SHARES}
    if any(goals.values()):
        row["curve"] = theft_curve(out, received, off, data)
        row["reach"] = {k: v and first_reaching(row["curve"], v) for k, v in goals.items()}
    return row


def goal(off: float, untrained: float, share: float) -> Optional[float]:
    """The stealing accuracy at `share` of the monitor-off theft, counted above the untrained surrogate's (None
    where the monitor-off thief stole nothing: less than NO_THEFT above it)."""
    return untrained + share * (off - untrained) if off - untrained >= NO_THEFT else None


def flags_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def monitored(thief: Thief, seed: int, name: str, folder: Path, steal: list[str], flags: dict, server: tuple, data):
    """The thief against a fresh server after the background traffic: its alerts, answers and theft."""
    label = f"{thief.name}-s{seed}"
    keys = folder / f"{label}-keys.toml"
    keys.unlink(missing_ok=True)
    names = [f"{thief.name}-{i}" for i in range(thief.keys)]
    secret = ",".join(serve_key.run(k, keys, 10**9, 1e6, 1e6, "block") for k in names)
    background = {
        k: serve_key.run(k, keys, 10**9, 1e6, 1e6, "block")
        for k in ["background"] + [f"young-{i}" for i in range(YOUNG)]
    }
    ledger = folder / f"{label}.sqlite"
    out = folder / f"{label}.h5"
    path, dataset, test = server
    proc, url = start(Path(path), keys, ledger, dataset)
    try:
        replay(url, background["background"], test[-BACKGROUND:])
        for i in range(YOUNG):
            replay(url, background[f"young-{i}"], test[i * YOUNG_IMAGES : (i + 1) * YOUNG_IMAGES])
        run = steal_quietly(
            [*steal, "--target", url, *thief.steal(**flags, seed=seed), "--out", str(out)],
            folder / f"{label}.log",
            {**flags_env(), "INI_API_KEY": secret},
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    every = ledger_alerts(ledger)
    found = [a for a in every if a["principal"] in names or a["principal"] == "*"]
    row = dict(victim=name, client=thief.name, seed=seed, moves=MOVES[thief.move], keys=thief.keys, alerts=len(found))
    row["background_alerts"] = [a for a in every if a["principal"] in background]
    if run.returncode != 0 or not out.exists():
        return dict(row, error=f"steal exited {run.returncode}")
    with open_artifact(out, "surrogate") as f:
        received, final = int(f.attrs["queries"]), float(f.attrs["stealing_accuracy"])
    with sqlite3.connect(ledger) as db:  # the thief's own keys, not the background's
        marks = ",".join("?" * len(names))
        spent, used, blocked = db.execute(
            f"SELECT COALESCE(SUM(spent), 0), COALESCE(SUM(spent > 0), 0), COALESCE(SUM(state = 'blocked'), 0) "
            f"FROM principals WHERE name IN ({marks})",
            names,
        ).fetchone()
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
    return row


def reach(row: dict, off: dict, out: Path, ledger: Path, names: list[str], mix: float, data) -> dict:
    """For each share of the monitor-off theft: the answers, queries and keys the thief had used when its theft
    curve first reached it, or the queries and keys it spent without reaching it."""
    found = {}
    at_alert = row.get("stealing_at_alert")
    known = (row["received_before_alert"], at_alert) if at_alert is not None else None
    curve = theft_curve(out, row["images"], row["stealing_final"], data, known)
    row["curve"] = curve
    for share in SHARES:
        target = goal(off["stealing_final"], off["untrained"], share)
        n = target and first_reaching(curve, target)
        if target is None:
            found[f"{share:.0%}"] = "no monitor-off theft"
        elif n is None:
            found[f"{share:.0%}"] = dict(reached=False, queries=row["spent"], keys=row["keys_used"])
        else:
            found[f"{share:.0%}"] = dict(reached=True, answers=n, **spent_until(ledger, names, n, mix))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", action="append", required=True, help="NAME=victim.h5 (repeatable)")
    parser.add_argument("--data", type=Path, required=True, help="the victims' prepared dataset")
    parser.add_argument("--pool", action="append", required=True, help="NAME=pool.h5 (repeatable)")
    parser.add_argument("--budget", type=int, default=2000, help="queries per thief (filler included)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, action="append", help="steal's --seed (repeatable) [default: 0]")
    parser.add_argument("--out", type=Path, default=Path("artifacts/serve-watch"))
    parser.add_argument("--smoke", action="store_true", help="300-query thieves, 1,000 benign images")
    parser.add_argument("--benign-only", action="store_true", help="only the benign clients")
    parser.add_argument("--skip-benign", action="store_true", help="only the thieves")
    parser.add_argument("--thieves", help="comma-separated thief names to run (e.g. sybil-hard-near) [default: all]")
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
    wanted = [t for t in THIEVES if not args.thieves or t.name in args.thieves.split(",")]
    unknown = set(args.thieves.split(",") if args.thieves else []) - {t.name for t in THIEVES}
    if unknown:
        sys.exit(f"--thieves: no thief named {', '.join(sorted(unknown))} (see THIEVES)")
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "watch.json"
    earlier = json.loads(saved.read_text()) if saved.exists() else []  # rows of earlier runs into the same --out
    results = []

    def save() -> None:
        redone = {(r["victim"], r["client"], r.get("seed")) for r in results}
        kept = [r for r in earlier if (r["victim"], r["client"], r.get("seed")) not in redone]
        saved.write_text(json.dumps(kept + results, indent=1, default=str))

    victims = [(name, str(Path(path).resolve())) for name, path in (v.split("=", 1) for v in args.victim)]
    for name, path in victims:
        (args.out / name).mkdir(parents=True, exist_ok=True)
        if not args.skip_benign:
            benign_clients(args, name, path, args.out / name, test, labels, data, results)
            save()
    if args.benign_only:
        print(table(results))
        return
    steal = [sys.executable, str(ROOT / "cli.py"), "steal", "--data", str(args.data), "--device", "cpu"]
    flags = dict(pools=pools, budget=budget, epochs=epochs)
    for seed in args.seed or [0]:
        for name, path in victims:
            folder = args.out / name
            offs = {}
            for thief in {t.off: t for t in wanted}.values():
                row = monitor_off(thief, seed, name, folder, [*steal, "--victim", path], flags, data)
                offs[thief.off] = row
                results.append(row)
                print(f"{name} {row['client']} s{seed}: {row}", file=sys.stderr, flush=True)
                save()
            for thief in wanted:
                server = (path, args.data, test)
                row = monitored(thief, seed, name, folder, [*steal, "--victim", path], flags, server, data)
                if "error" not in row:
                    stem = folder / f"{thief.name}-s{seed}"
                    names = [f"{thief.name}-{i}" for i in range(thief.keys)]
                    mix = 0.5 if thief.move.endswith("mix") else 0.0
                    row["off"] = offs[thief.off]["stealing_final"]
                    files = (stem.with_suffix(".h5"), stem.with_suffix(".sqlite"))
                    row["reach"] = reach(row, offs[thief.off], *files, names, mix, data)
                results.append(row)
                print(f"{name} {thief.name} s{seed}: {row}", file=sys.stderr, flush=True)
                save()
    save()
    print(table(results))
    print()
    print(summary(results))


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def keys_text(count) -> str:
    return f"{count} key" if str(count) == "1" else f"{count} keys"


def reached(point) -> str:
    """A share of the monitor-off theft: where it was reached, or what was spent without reaching it."""
    if point is None or isinstance(point, str):
        return point or "-"
    if isinstance(point, int):
        return f"{point:,} answers"
    if point["reached"]:
        return f"{point['queries']:,} queries / {keys_text(point['keys'])} ({point['answers']:,} answers)"
    return f"not reached at {point['queries']:,} queries / {keys_text(point['keys'])}"


def table(results: list[dict]) -> str:
    lines = [
        "| victim | client | seed | keys (used / blocked) | answers received | spent (filler, withheld) "
        "| alerts: signals | first alert at (answers received) | stealing at first alert "
        "| stealing before block (final) | monitor off | 50 % of monitor off | 80 % of monitor off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "global_alerts" in r:
            signals = sorted({a["signal"] for a in r["global_alerts"]})
            lines.append(
                f"| {r['victim']} | {r['client']} | - | - | - | - | {len(r['global_alerts'])}: "
                f"{', '.join(signals) or 'none'} | - | - | - | - | - | - |"
            )
            continue
        keys = f"{r.get('keys_used', '-')} / {r.get('keys_blocked', '-')}" if "keys" in r else "1"
        first = r.get("first")
        at = f"{first['signal']} ({r.get('received_before_alert', first['queries']):,})" if first else "none"
        final = percent(r.get("stealing_final"))
        images = f"{r['images']:,}" if "images" in r else r.get("error", "-")
        shares = r.get("reach") or {}
        lines.append(
            f"| {r['victim']} | {r['client']} | {r.get('seed', '-')} | {keys} | {images} | {r.get('spent', '-')} "
            f"| {r.get('alerts', '-')}: {', '.join(r.get('signals', [])) or 'none'} | {at} "
            f"| {percent(r.get('stealing_at_alert'))} | {final} | {percent(r.get('off'))} "
            f"| {reached(shares.get('50%'))} | {reached(shares.get('80%'))} |"
        )
    return "\n".join(lines)


def spread(values: list[float]) -> str:
    """Mean ± sample standard deviation in percent (the value alone for one seed)."""
    if not values:
        return "-"
    if len(values) == 1:
        return percent(values[0])
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f} %"


def span(values: list[int]) -> str:
    return f"{min(values):,}" if min(values) == max(values) else f"{min(values):,}-{max(values):,}"


def reached_over(points: list) -> str:
    """A share of the monitor-off theft over the seeds: where it was reached, and what the others spent without."""
    parts = []

    def seeds(some: list) -> str:
        return "" if len(some) == len(points) else f"{len(some)} of {len(points)} seeds: "

    for words in sorted({p for p in points if isinstance(p, str)}):  # no monitor-off theft
        parts.append(seeds([p for p in points if p == words]) + words)
    for hit, words in ((True, ""), (False, "not reached at ")):
        some = [p for p in points if isinstance(p, dict) and p["reached"] is hit]
        if some:
            queries, held = span([p["queries"] for p in some]), span([p["keys"] for p in some])
            parts.append(f"{seeds(some)}{words}{queries} queries / {keys_text(held)}")
    return "; ".join(parts)


def summary(results: list[dict]) -> str:
    """One line per thief and victim over its seeds: the stealing accuracies as mean ± sd (before the first alert:
    the untrained surrogate's where no answer came before it), the answers received and the first alerts as ranges
    and sets, and where each share of the monitor-off theft was reached."""
    lines = [
        "| victim | thief | seeds | answers received | first alert signals (answers received then) "
        "| stealing at first alert | stealing before block | monitor off | 50 % of monitor off | 80 % of monitor off |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    untrained = {(r["victim"], r["seed"], r["client"]): r.get("untrained") for r in results if "seed" in r}
    offs = {t.name: f"monitor off, {t.off}" for t in THIEVES}
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        if "seed" in r and "stealing_final" in r and not r["client"].startswith("monitor off"):
            cells.setdefault((r["victim"], r["client"]), []).append(r)
    for (victim, client), rows in cells.items():
        signals = sorted({r["first"]["signal"] for r in rows if r.get("first")}) or ["none"]
        before = [r["received_before_alert"] for r in rows if r.get("first")]
        at_alert = [
            r["stealing_final"]
            if not r.get("first")
            else r["stealing_at_alert"]
            if r["stealing_at_alert"] is not None
            else untrained.get((victim, r["seed"], offs.get(client)))
            for r in rows
        ]
        lines.append(
            f"| {victim} | {client} | {len(rows)} | {span([r['images'] for r in rows])} | {', '.join(signals)}"
            f"{f' ({span(before)})' if before else ''} | {spread([v for v in at_alert if v is not None])} "
            f"| {spread([r['stealing_final'] for r in rows])} | {spread([r['off'] for r in rows])} "
            f"| {reached_over([r['reach']['50%'] for r in rows])} | {reached_over([r['reach']['80%'] for r in rows])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

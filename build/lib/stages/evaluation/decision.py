"""The decision table of `evaluate`: for each threat (victim dataset, attack, label mode, pool) and each benign-cost
budget, the setting of each defense that leaves the thief the least within that budget, and the defense that
wins (docs/method.md, "Metrics").

A defense is a family and each of its settings a candidate: a posterior defense with its parameters on an
undefended victim, an InI victim recipe (preset and options), adaptive misinformation on its outlier-exposure
victim, and `none`, the undefended victim itself. A setting's benign cost is the mean benign accuracy (as deployed)
of the undefended victim of the same training recipe (same dataset, architecture, epochs, optimiser: every entry
of the undefended recipe but objective and OOD set) over the seeds the setting was measured on, minus its own mean,
in points: paired by seed.

Settings are compared paired by seed as well: one leaves the thief less than another when its mean over the seeds
both were measured on is lower (victims of one seed share their data order and initialisation, and a thief's seed
moves its accuracy by more than the gaps between good defenses). A sweep point measured on seed 0 alone thus meets
a 3-seed setting on seed 0, not against the other seeds' draws. Among several settings the pick is the one that
leaves less than the most others (a round robin of paired comparisons), then the lower own mean.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict

from models.params import UserError

KIND_NAMES = {"ce": "undefended", "outlier-exposure": "AM"}
NOT_TRAINING = ("objective", "ood")  # recipe entries that make a victim undefended, InI or AM, not how it trained
# the columns that name a group of rows (one setting against one threat): evaluate's LABELS
GROUP = ("dataset", "victim", "defense", "attack", "label", "pool")
TOLERANCE = 1e-9  # points: a cost that equals its budget up to rounding fits it
TEXT = ("dataset", "attack", "label", "pool", "family", "setting", "victim", "defense", "note")
NUMBERS = (
    "budget",
    "benign_cost",
    "benign_accuracy",
    "undefended_accuracy",
    "stealing_mean",
    "stealing_std",
    "n",
    "winner",
    "paired_gap",
    "paired_seeds",
)


def parse_budgets(text: str) -> list[float]:
    """`--benign-budget 0.5,1,2` as sorted points; `none`: no decision table."""
    if text.strip().lower() == "none":
        return []
    budgets = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--benign-budget {text}: {part.strip()!r} is not a number of points") from None
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--benign-budget {text}: budgets are points of benign accuracy, finite and >= 0")
        budgets.append(value)
    return sorted(set(budgets))


def _recipe(entry: dict) -> dict:
    return json.loads(entry["victim_recipe"])


def family(entry: dict) -> str:
    """The defense an entry (a row or group of metrics) measures: its posterior defense on an undefended victim
    (`none`: the undefended victim itself), adaptive misinformation on its own victim, or its victim's kind (InI)."""
    defense = entry["defense"].split(" ")[0]
    objective = _recipe(entry).get("objective", entry["victim_kind"])
    if objective == "ce" or (objective == "outlier-exposure" and defense == "adaptive-misinformation"):
        return defense
    kind = "InI" if objective == "ini" else KIND_NAMES.get(objective, objective)
    return kind if defense == "none" else f"{kind} + {defense}"


def victim_names(entries: list[dict]) -> dict[str, str]:
    """A name per victim recipe (`victim`): its kind, plus the recipe entries that set it apart from the other
    victims of its kind and dataset (what every one of them changed from the defaults goes unsaid)."""
    recipes = {e["victim"]: e for e in entries}
    common: dict[tuple, set] = {}
    for e in recipes.values():
        items = {(k, json.dumps(v)) for k, v in json.loads(e["victim_changes"]).items()}
        key = (e["dataset"], e["victim_kind"])
        common[key] = items if key not in common else common[key] & items
    names = {}
    for victim, e in recipes.items():
        shared = common[e["dataset"], e["victim_kind"]]
        apart = [
            f"{k}={v if isinstance(v, str) else json.dumps(v)}"
            for k, v in sorted(json.loads(e["victim_changes"]).items())
            if (k, json.dumps(v)) not in shared
        ]
        names[victim] = " ".join([KIND_NAMES.get(e["victim_kind"], e["victim_kind"]), *apart])
    return names


def setting_names(groups: list[dict]) -> dict[tuple, str]:
    """(dataset, victim, defense) -> how the decision table names that setting of its family: the defense with its
    parameters, the InI victim's name, and the victim's name too wherever a family holds several victims."""
    names = victim_names(groups)
    victims: dict[tuple, set] = defaultdict(set)
    for g in groups:
        victims[g["dataset"], family(g)].add(g["victim"])
    out = {}
    for g in groups:
        own = family(g)
        by_victim = _recipe(g).get("objective") not in ("ce", "outlier-exposure") or own == "outlier-exposure"
        parts = [names[g["victim"]]] if by_victim or len(victims[g["dataset"], own]) > 1 else []
        parts += [g["defense"]] if g["defense"] != "none" else []
        out[g["dataset"], g["victim"], g["defense"]] = " ".join(parts) or names[g["victim"]]
    return out


def undefended_accuracy(rows: list[dict], groups: list[dict]) -> dict[tuple, dict[str, float]]:
    """(dataset, victim) -> seed -> benign accuracy of the undefended victim with that victim's training recipe,
    for every victim setting that has one."""
    seeds: dict[tuple, dict[str, float]] = defaultdict(dict)  # undefended (dataset, victim) -> seed -> benign
    recipes: dict[tuple, dict] = {}
    for r in rows:
        if _recipe(r).get("objective") == "ce" and r["defense"] == "none":
            seeds[r["dataset"], r["victim"]][str(r["seed"])] = float(r["benign_accuracy"])
            recipes[r["dataset"], r["victim"]] = _recipe(r)
    out = {}
    for g in groups:
        recipe = _recipe(g)
        same = [
            key
            for key, base in recipes.items()
            if key[0] == g["dataset"]
            and all(k in recipe and recipe[k] == v for k, v in base.items() if k not in NOT_TRAINING)
        ]
        if len(same) == 1:
            out[g["dataset"], g["victim"]] = seeds[same[0]]
    return out


def _reference(undefended: dict[str, float], seeds: set[str]) -> float:
    """The undefended victim's mean benign accuracy over the seeds a setting was measured on (a cost is paired by
    seed: victims of one seed share their data order and initialisation), over all of its seeds where it has none
    of them."""
    matched = [undefended[s] for s in sorted(seeds) if s in undefended]
    return statistics.mean(matched or undefended.values())


def per_seed(rows: list[dict], metric: str) -> dict[tuple, dict[str, float]]:
    """(the columns that name a group) -> seed -> `metric`, where measured."""
    out: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        value = float(r[metric]) if metric in r else math.nan
        if math.isfinite(value):
            out[tuple(r[k] for k in GROUP)][str(r["seed"])] = value
    return out


def paired_gap(a: dict[str, float], b: dict[str, float]) -> tuple[float, int]:
    """a's mean minus b's over the seeds both were measured on, and how many those are (nan, 0: none shared)."""
    common = sorted(a.keys() & b.keys())
    if not common:
        return math.nan, 0
    return statistics.mean(a[s] - b[s] for s in common), len(common)


def _theft_gap(a: dict, b: dict) -> float:
    """How much more candidate a leaves the thief than b: paired by seed, own means where they share no seed."""
    gap, _ = paired_gap(a["values"], b["values"])
    return gap if math.isfinite(gap) else a["mean"] - b["mean"]


def _beats(a: dict, b: dict) -> bool:
    """Whether candidate a leaves the thief less than b (`_theft_gap`); on a tie, the cheaper; then no defense,
    which a defense must beat."""
    gap = _theft_gap(a, b)
    if abs(gap) > TOLERANCE:
        return gap < 0
    if abs(a["cost"] - b["cost"]) > TOLERANCE:
        return a["cost"] < b["cost"]
    return a["family"] == "none" and b["family"] != "none"


def _ranked(candidates: list[dict]) -> list[dict]:
    """Candidates best first: most paired wins over the others, then lower own mean, cost, no defense, name."""
    wins = {id(c): sum(_beats(c, o) for o in candidates if o is not c) for c in candidates}
    return sorted(candidates, key=lambda c: (-wins[id(c)], c["mean"], c["cost"], c["family"] != "none", c["name"]))


def decide(rows: list[dict], groups: list[dict], budgets: list[float], metric: str) -> list[dict]:
    """One entry per (threat, budget, family): its setting that leaves the thief least (paired by seed, see above)
    among those whose benign cost fits the budget, and `winner` 1 for the family whose pick leaves least over all
    (ties: the cheaper setting, then the undefended victim, which a defense must beat; a tie beyond that names every
    tied family). `paired_gap`: the entry's mean minus the winner's over their shared seeds (the winner's: minus the
    next best's), `paired_seeds` how many. A family with no setting that fits, or none with a same-recipe undefended
    victim to measure its cost against, gets an entry with an empty setting and a note."""
    base = undefended_accuracy(rows, groups)
    names = setting_names(groups)
    seeds: dict[tuple, set[str]] = defaultdict(set)  # a group's seeds, by the columns that name a group
    for r in rows:
        seeds[tuple(r[k] for k in GROUP)].add(str(r["seed"]))
    values = per_seed(rows, metric)
    threats: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for g in groups:
        if g["attack"] != "-":
            threats[g["dataset"], g["attack"], g["label"], g["pool"]][family(g)].append(g)
    out = []
    for threat in sorted(threats):
        for budget in budgets:
            picked = [
                _pick(threat, own, options, budget, base, names, metric, seeds, values)
                for own, options in sorted(threats[threat].items())
            ]
            entries = [entry for entry, _ in picked]
            measured = [c for _, c in picked if c is not None]
            if measured:
                ranked = _ranked(measured)
                best = ranked[0]
                for c in ranked:
                    c["entry"]["winner"] = float(c is best or _same(c, best))
                runner_up = next((c for c in ranked if not c["entry"]["winner"]), None)
                for c in ranked:
                    against = runner_up if c["entry"]["winner"] else best
                    if against is not None:
                        gap, shared = paired_gap(c["values"], against["values"])
                        c["entry"].update(paired_gap=gap, paired_seeds=float(shared))
            out += entries
    return out


def _same(a: dict, b: dict) -> bool:
    """A full tie: the same theft on every shared seed (own means where none is shared) and the same cost."""
    return (
        abs(_theft_gap(a, b)) <= TOLERANCE
        and abs(a["cost"] - b["cost"]) <= TOLERANCE
        and (a["family"] == "none") == (b["family"] == "none")
    )


def _pick(
    threat: tuple,
    own: str,
    options: list[dict],
    budget: float,
    base: dict,
    names: dict,
    metric: str,
    seeds: dict,
    values: dict,
) -> tuple[dict, dict | None]:
    """A family's entry for one threat and budget, and its pick as a candidate for the winner (None: no pick)."""
    dataset, attack, label, pool = threat
    entry = dict(
        dataset=dataset,
        attack=attack,
        label=label,
        pool=pool,
        family=own,
        setting="",
        victim="",
        defense="",
        note="",
        budget=budget,
        benign_cost=math.nan,
        benign_accuracy=math.nan,
        undefended_accuracy=math.nan,
        stealing_mean=math.nan,
        stealing_std=math.nan,
        n=0.0,
        winner=0.0,
        paired_gap=math.nan,
        paired_seeds=0.0,
    )
    measured = [g for g in options if math.isfinite(g[f"{metric}_mean"])]
    costed = []  # candidates: a group, its benign cost in points, the undefended accuracy it is measured from
    for g in measured:
        if (dataset, g["victim"]) in base:
            key = tuple(g[k] for k in GROUP)
            undefended = _reference(base[dataset, g["victim"]], seeds[key])
            costed.append(
                dict(
                    group=g,
                    cost=100 * (undefended - g["benign_accuracy_mean"]),
                    undefended=undefended,
                    mean=g[f"{metric}_mean"],
                    values=values.get(key, {}),
                    family=own,
                    name=names[dataset, g["victim"], g["defense"]],
                    entry=entry,
                )
            )
    fitting = [c for c in costed if c["cost"] <= budget + TOLERANCE]
    if not costed:
        entry["note"] = "no same-recipe undefended victim measured" if measured else f"no {metric} measured"
        return entry, None
    if not fitting:
        entry["note"] = f"no setting within {budget:g} pt"
        return entry, None
    pick = _ranked(fitting)[0]
    g = pick["group"]
    entry.update(
        setting=pick["name"],
        victim=g["victim"],
        defense=g["defense"],
        benign_cost=pick["cost"],
        benign_accuracy=g["benign_accuracy_mean"],
        undefended_accuracy=pick["undefended"],
        stealing_mean=pick["mean"],
        stealing_std=g[f"{metric}_std"],
        n=float(g["n"]),
    )
    return entry, pick


METRIC_NAMES = {
    "stealing_accuracy_relabelled": "stealing accuracy after the best relabelling",
    "stealing_accuracy": "stealing accuracy",
}


def _cell(e: dict) -> str:
    spread = f" ± {100 * e['stealing_std']:.1f}" if e["n"] > 1 else ""
    return f"{100 * e['stealing_mean']:.1f}{spread} ({e['n']:.0f})"


def _paired(e: dict) -> str:
    if not math.isfinite(e["paired_gap"]):
        return "no shared seed" if e["paired_seeds"] == 0 else "-"  # NaN seeds: decided before paired comparison
    return f"{100 * e['paired_gap']:+.1f} ({e['paired_seeds']:.0f})"


def _short(e: dict) -> str:
    """The setting without its family's name where it starts with it (`mad eps=0.5` in the row of mad)."""
    return e["setting"].removeprefix(e["family"]).strip() or e["setting"]


def markdown(decision: list[dict], metric: str) -> list[str]:
    """The decision table (one row per threat and budget: the winner, its setting, the thief's accuracy, its benign
    cost, the next best defense and the undefended victim's), then each defense's pick per budget."""
    if not decision:
        return []
    what = METRIC_NAMES.get(metric, metric)
    budgets = sorted({e["budget"] for e in decision})
    lines = [
        "## Decision: the defense that leaves the thief least, per benign cost",
        "",
        f"For each threat and each budget of benign cost (points of benign accuracy as deployed below the "
        f"undefended victim of the same training recipe, over the seeds the setting was measured on), every "
        f"setting of every defense whose cost fits is a candidate; a defense's pick is its setting that leaves "
        f"the thief least ({what}), and the winner the defense whose pick leaves the least (a tie goes to the "
        f"cheaper, then to no defense). Settings are compared paired by seed: on the seeds both were measured on "
        f"(a round robin where more than two compete). Cells: mean ± sample std (n seeds) over each setting's own "
        f"seeds, in %; `paired`: the winner's accuracy minus the next best's on their shared seeds, in points "
        f"(how many seeds). A negative cost: more benign accuracy than the undefended victim.",
        "",
        "| victim data | attack | labels | pool | budget | winner: setting | thief's accuracy | benign cost "
        "| next best | paired | undefended |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    threats: dict[tuple, list[dict]] = defaultdict(list)
    for e in decision:
        threats[e["dataset"], e["attack"], e["label"], e["pool"], e["budget"]].append(e)
    for (dataset, attack, label, pool, budget), entries in threats.items():
        won = [e for e in entries if e["winner"]]
        rest = sorted(
            (e for e in entries if e["setting"] and not e["winner"]),
            key=lambda e: (e["paired_gap"] if math.isfinite(e["paired_gap"]) else math.inf, e["stealing_mean"]),
        )
        plain = [e for e in entries if e["family"] == "none" and e["setting"]]
        winner = (
            " = ".join(
                e["setting"] if e["setting"].startswith(e["family"]) else f"{e['family']}: {e['setting']}" for e in won
            )
            or "-"
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    dataset,
                    attack,
                    label,
                    pool,
                    f"≤ {budget:g} pt",
                    winner,
                    _cell(won[0]) if won else "-",
                    f"{won[0]['benign_cost']:+.2f} pt" if won else "-",
                    f"{rest[0]['family']}: {_short(rest[0])}, {_cell(rest[0])}" if rest else "-",
                    _paired(won[0]) if won and rest else "-",
                    _cell(plain[0]) if plain else "-",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Each defense's pick per budget (its setting and benign cost in points; **bold**: the winner):",
        "",
        "| victim data | attack | labels | pool | defense | " + " | ".join(f"≤ {b:g} pt" for b in budgets) + " |",
        "|---|---|---|---|---|" + "---|" * len(budgets),
    ]
    rows: dict[tuple, dict[float, dict]] = defaultdict(dict)
    for e in decision:
        rows[e["dataset"], e["attack"], e["label"], e["pool"], e["family"]][e["budget"]] = e
    order = sorted(rows, key=lambda k: (k[:4], k[4] != "none", k[4]))
    for key in order:
        cells = []
        for budget in budgets:
            e = rows[key].get(budget)
            if e is None or not e["setting"]:
                cells.append(e["note"] if e and e["note"] else "-")
                continue
            text = f"{_cell(e)}, {_short(e)} ({e['benign_cost']:+.2f})"
            cells.append(f"**{text}**" if e["winner"] else text)
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return lines

"""A study of the experiments, read from its YAML configuration (experiments/config/): the victims, defenses,
attacks and cells it names, the artifact paths of each, and the CLI flags that make them. The Snakefile's rules
call these helpers; nothing here runs a stage. A cell's file name holds every dimension of it (dataset, victim
recipe, defense, seed, attack, label, pool), so the file alone says which cell it is and whether it is done.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

SEEN = "seen"  # in a list of datasets: the OOD set the victim dataset's defenses train on (config `seen`)
STAGES = ("train", "train-ini")
# Cluster requests per rule, for one thread on CPU; a study's `resources` overrides them (cifar10: GPUs, hours).
RESOURCES = {
    rule: dict(mem_mb=mem, runtime=minutes, gpu=0)
    for rule, mem, minutes in (
        ("prepare", 4000, 30),
        ("train", 4000, 240),
        ("train_ini", 8000, 480),
        ("steal", 4000, 240),
        ("evaluate", 8000, 240),
    )
}
SUMMARIES = {
    "grid": "",
    "lofo": "--lofo",
    "variants": "--variants",
    "near": "--near",
    "decision": "--decision",
}  # experiments/summarise.py's tables


class ConfigError(ValueError):
    """A study configuration that names something it does not define, or a cell two ways."""


@dataclass(frozen=True)
class Recipe:
    """How a victim is trained: the stage, its flags, and its OOD sets (names or `seen`; `per_dataset` replaces them
    for the datasets it names). A leave-one-out recipe names the family it holds out; its OOD sets also drop the
    victim dataset's same-task sets."""

    stage: str
    flags: str = ""
    ood: tuple[str, ...] = ()
    held_out: str | None = None
    leave_one_out: bool = False
    per_dataset: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Defense:
    defense: str
    params: tuple[tuple[str, str], ...] = ()
    hard_only: bool = False  # answers top-1 labels only: no soft-label cell, no attack that needs probabilities


@dataclass(frozen=True)
class Attack:
    attack: str
    budget: int | None = None
    epochs: int | None = None
    epochs_unseen: int | None = None  # pools other than the dataset's seen set (a small pool needs more epochs)
    steps: int | None = None  # surrogate SGD steps of batch 128: epochs follow from the transfer-set size
    flags: str = ""
    soft_only: bool = False


@dataclass(frozen=True)
class Cell:
    dataset: str
    victim: str
    defense: str
    seed: int
    attack: str
    label: str | None = None
    pool: str | None = None


def _names(value, what: str) -> list[str]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        raise ConfigError(f"{what} must be a list of names, not {value!r}")
    return [str(v) for v in value]


def _by_dataset(value, what: str, datasets: list[str]) -> dict[str, list[str]]:
    """A list of names for every dataset, or a mapping dataset -> list (a dataset it does not name gets none)."""
    if isinstance(value, dict):
        return {str(d): _names(v, f"{what} of {d}") for d, v in value.items()}
    names = _names(value, what)
    return {d: names for d in datasets}


def _points(name: str, params: dict) -> list[tuple[str, dict]]:
    """A sweep: every list-valued parameter spans its values (a product over several), each point named
    `<name>-<key><value>` in the parameters' order, e.g. mad-eps1.1; without lists, the one point `name`."""
    swept = [k for k, v in params.items() if isinstance(v, list)]
    if not swept:
        return [(name, params)]
    points = []
    for values in itertools.product(*(params[k] for k in swept)):
        point = {**params, **dict(zip(swept, values, strict=False))}
        points.append((name + "".join(f"-{k}{v}" for k, v in zip(swept, values, strict=False)), point))
    return points


def _unmarked(stolen: Path) -> bool:
    """A finished watermark cell whose answers hold no mark (a thief whose queries all look benign, at the base
    rate): there is nothing to verify, and `verify` refuses such evidence. Read when the cell exists, so a run
    before it plans its verification, and verify's one-line error stops that run; the next one leaves it out."""
    if not stolen.exists():
        return False
    import h5py

    with h5py.File(stolen, "r") as f:
        return "transfer/watermark/marked" in f and not f["transfer/watermark/marked"][()].any()


class Study:
    """One configuration's cells and artifacts. Paths are `<out>/data/<name>.h5`, `<out>/victims/<dataset>-
    <victim>-s<seed>.h5` and `<out>/stolen/<dataset>-<victim>-<defense>-s<seed>-<attack>[-<label>-<pool>].h5`
    (with `defense_in_names: false`, an undefended cell drops `-none`, as the leave-one-family-out and the options
    studies have always named theirs)."""

    def __init__(self, config: dict):
        self.config = config
        for key in ("out", "datasets", "seeds", "victims", "attacks"):
            if key not in config:
                raise ConfigError(f"the study configuration needs `{key}`")
        self.out = Path(config["out"])
        self.datasets = _names(config["datasets"], "datasets")
        self.seen = {str(k): str(v) for k, v in (config.get("seen") or {}).items()}
        self.same_task = {str(k): _names(v, "same_task") for k, v in (config.get("same_task") or {}).items()}
        self.flags = {stage: str(v or "") for stage, v in (config.get("flags") or {}).items()}
        self.prepare_flags = {str(k): str(v) for k, v in (config.get("prepare") or {}).items()}
        self.defense_in_names = bool(config.get("defense_in_names", True))
        self.summary = config.get("summarise", "grid")
        if self.summary not in SUMMARIES:
            raise ConfigError(f"summarise must be one of {', '.join(SUMMARIES)}, not {self.summary!r}")
        self.groups: dict[str, list[str]] = {}  # a swept victim or defense: its points' names
        self.recipes = self._recipes(config["victims"])
        self.defenses = self._defenses(config.get("defenses") or {"none": {}})
        self.attacks = self._attacks(config["attacks"])
        self.cells: dict[Path, Cell] = {}
        self.victims: set[tuple[str, str, int]] = set()
        # the watermark's secret, made once for the study (rule watermark_key) when a defense is the watermark
        watermarked = any(d.defense == "watermark" for d in self.defenses.values())
        self.key = Path(config.get("watermark_key") or self.out / "watermark.key") if watermarked else None
        self.independent: set[tuple[str, str, int]] = set()  # victims trained only to be suspects that saw no marks
        if config.get("leave_one_out"):  # first: cell blocks may name its victims
            self._add_leave_one_out(config["leave_one_out"])
        for block in config.get("cells") or []:
            self._add_block(block)
        if config.get("independent"):
            self._add_independent(config["independent"])
        for victim in _names(config.get("always_train") or [], "always_train"):
            self._recipe(victim)
            for dataset in self.datasets:
                self.victims.update((dataset, victim, s) for s in self._seeds(config["seeds"], dataset))

    # --- configuration -------------------------------------------------------------------------------------------
    def _recipes(self, victims: dict) -> dict[str, Recipe]:
        recipes = {}
        for key, spec in victims.items():
            spec = dict(spec or {})
            stage = spec.pop("stage", "train")
            if stage not in STAGES:
                raise ConfigError(f"victim {key}: stage must be train or train-ini, not {stage!r}")
            flags, ood = str(spec.pop("flags", "") or ""), spec.pop("ood", [])
            per_dataset = tuple((d, tuple(v)) for d, v in _by_dataset(ood, f"victim {key}: ood", []).items())
            ood = () if isinstance(ood, dict) else tuple(_names(ood, f"victim {key}: ood"))
            options = spec.pop("options", {}) or {}
            if spec:
                raise ConfigError(f"victim {key}: unknown keys {', '.join(spec)}")
            self.groups[f"victim {key}"] = [name for name, _ in _points(str(key), options)]
            for name, point in _points(str(key), options):
                extra = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in point.items())
                recipes[name] = Recipe(stage, " ".join(f for f in (flags, extra) if f), ood, per_dataset=per_dataset)
        return recipes

    def _defenses(self, defenses: dict) -> dict[str, Defense]:
        out = {}
        for key, spec in defenses.items():
            spec = dict(spec or {})
            defense, hard_only = str(spec.pop("defense", key)), bool(spec.pop("hard_only", False))
            params = spec.pop("params", {}) or {}
            if spec:
                raise ConfigError(f"defense {key}: unknown keys {', '.join(spec)}")
            self.groups[f"defense {key}"] = [name for name, _ in _points(str(key), params)]
            for name, point in _points(str(key), params):
                out[name] = Defense(defense, tuple((str(k), str(v)) for k, v in point.items()), hard_only)
        return out

    def _attacks(self, attacks: dict) -> dict[str, Attack]:
        out = {}
        for key, spec in attacks.items():
            spec = dict(spec or {})
            try:
                out[str(key)] = Attack(attack=str(spec.pop("attack", key)), **spec)
            except TypeError as e:
                raise ConfigError(f"attack {key}: {e}") from None
            if out[str(key)].epochs is not None and out[str(key)].steps is not None:
                raise ConfigError(f"attack {key}: give epochs or steps, not both")
        return out

    def _recipe(self, victim: str) -> Recipe:
        if victim not in self.recipes:
            raise ConfigError(f"victim {victim!r} is not in `victims` ({', '.join(self.recipes)})")
        return self.recipes[victim]

    def _seeds(self, seeds, dataset: str) -> list[int]:
        """A list of seeds, or a mapping dataset -> list (a dataset it does not name gets none)."""
        if isinstance(seeds, dict):
            seeds = seeds.get(dataset, [])
        return [int(s) for s in _names(seeds, "seeds")]

    def resolve(self, name: str, dataset: str) -> str:
        if name != SEEN:
            return name
        if dataset not in self.seen:
            raise ConfigError(f"`seen` names no OOD set for {dataset}")
        return self.seen[dataset]

    def _pairs(self, pairs) -> list[tuple[str, str]]:
        """victim:defense pairs; a swept victim or defense stands for every point of its sweep."""
        out = []
        for pair in _names(pairs, "pairs"):
            victim, _, defense = pair.partition(":")
            victims = self.groups.get(f"victim {victim}") or [victim]
            defenses = self.groups.get(f"defense {defense}") or [defense]
            for v in victims:
                self._recipe(v)
            for d in defenses:
                if d not in self.defenses:
                    raise ConfigError(f"pair {pair}: defense {d!r} is not in `defenses` ({', '.join(self.defenses)})")
            out += list(itertools.product(victims, defenses))
        return out

    def _add(self, cell: Cell) -> None:
        defense, attack = self.defenses[cell.defense], self.attacks[cell.attack]
        if defense.hard_only and (cell.label == "soft" or attack.soft_only):
            return  # the defense answers labels only
        path = self.stolen(cell)
        if self.cells.setdefault(path, cell) != cell:
            raise ConfigError(f"{path} names two cells: {self.cells[path]} and {cell}")
        self.victims.add((cell.dataset, cell.victim, cell.seed))

    def _add_block(self, block: dict) -> None:
        block = dict(block)
        # a block's datasets narrow the study's (a run with `--config datasets=[mnist]` skips fashionmnist's blocks,
        # whose victims may exist for fashionmnist only)
        datasets = [d for d in _names(block.pop("datasets", self.datasets), "datasets") if d in self.datasets]
        if not datasets:
            return
        pairs = self._pairs(block.pop("pairs"))
        attacks = _names(block.pop("attacks"), "attacks")
        for a in attacks:
            if a not in self.attacks:
                raise ConfigError(f"attack {a!r} is not in `attacks` ({', '.join(self.attacks)})")
        labels, pools = block.pop("labels", None), block.pop("pools", None)
        if (labels is None) != (pools is None):
            raise ConfigError("a cell block names labels and pools together (pool attacks) or neither")
        seeds = block.pop("seeds", self.config["seeds"])
        if block:
            raise ConfigError(f"a cell block has unknown keys {', '.join(block)}")
        for dataset in datasets:
            for seed in self._seeds(seeds, dataset):
                for (victim, defense), attack in itertools.product(pairs, attacks):
                    if pools is None:
                        self._add(Cell(dataset, victim, defense, seed, attack))
                        continue
                    for pool, label in itertools.product(_names(pools, "pools"), _names(labels, "labels")):
                        self._add(Cell(dataset, victim, defense, seed, attack, label, self.resolve(pool, dataset)))

    def _add_leave_one_out(self, spec: dict) -> None:
        """Each victim of the recipe is trained on every family but one and attacked with the family it left out;
        a family of the victim's own task (`same_task`) is never trained on, so it attacks the victim trained on
        all the others (`<name>-all`), as do the `evaluation` pools (sets no recipe trains on). `always`: families
        every victim trains on and none holds out. Families, `always` and `evaluation` are lists, or mappings
        dataset -> list where datasets need families of their own."""
        spec = dict(spec)
        name = str(spec.pop("name"))
        families = _by_dataset(spec.pop("families"), "leave_one_out: families", self.datasets)
        always = _by_dataset(spec.pop("always", []), "leave_one_out: always", self.datasets)
        evaluation = _by_dataset(spec.pop("evaluation", []), "leave_one_out: evaluation", self.datasets)
        stage, flags = spec.pop("stage", "train-ini"), str(spec.pop("flags", "") or "")
        attacks, labels = _names(spec.pop("attacks"), "attacks"), _names(spec.pop("labels"), "labels")
        seeds = spec.pop("seeds", self.config["seeds"])
        if spec:
            raise ConfigError(f"leave_one_out has unknown keys {', '.join(spec)}")
        for dataset in self.datasets:
            trained = (*always.get(dataset, []), *families.get(dataset, []))
            held_out = [(h, h) for h in (self.resolve(f, dataset) for f in families.get(dataset, []))]
            for pool, held in held_out + [(p, None) for p in evaluation.get(dataset, [])]:
                untrained = held is None or held in self.same_task.get(dataset, [])
                victim = f"{name}-all" if untrained else f"{name}-no-{held}"
                recipe = self.recipes.get(victim) or Recipe(
                    stage, flags, (), None if untrained else held, leave_one_out=True
                )
                lists = dict(recipe.per_dataset)
                lists.setdefault(dataset, trained)
                self.recipes[victim] = dataclasses.replace(recipe, per_dataset=tuple(lists.items()))
                for seed in self._seeds(seeds, dataset):
                    for attack, label in itertools.product(attacks, labels):
                        self._add(Cell(dataset, victim, "none", seed, attack, label, pool))

    def _add_independent(self, spec: dict) -> None:
        """Victims of the given recipes and seeds, trained on the true data and never attacked: suspects that never
        saw a marked answer, for the false-positive rate of `verify`."""
        spec = dict(spec)
        recipes, seeds = _names(spec.pop("victims"), "independent: victims"), spec.pop("seeds")
        if spec:
            raise ConfigError(f"independent has unknown keys {', '.join(spec)}")
        for victim in recipes:
            self._recipe(victim)
            for dataset in self.datasets:
                self.independent.update((dataset, victim, s) for s in self._seeds(seeds, dataset))
        self.victims |= self.independent

    # --- verification --------------------------------------------------------------------------------------------
    @functools.cached_property
    def verifications(self) -> dict[str, tuple[str, str]]:
        """`verify` runs, by output name (under <out>/verified/), each (suspect, evidence); read once, since it opens
        every finished watermark cell. With `verify` in the configuration: `own/<cell>`, every watermark cell against
        its own transfer set; and `independent/<suspect>--<cell>`, every model that never saw a marked answer (the
        `independent` victims and the cells stolen through no defense) against each watermark cell of the dataset
        whose seed is in `evidence_seeds` and whose attack, label and pool match one of `evidence`
        (`<attack>[-<label>-<pool>]`, `seen` allowed)."""
        spec = self.config.get("verify")
        if not spec:
            return {}
        spec = dict(spec)
        evidence = set(_names(spec.pop("evidence", []), "verify: evidence"))
        evidence_seeds = {int(s) for s in _names(spec.pop("evidence_seeds", [0]), "verify: evidence_seeds")}
        if spec:
            raise ConfigError(f"verify has unknown keys {', '.join(spec)}")
        marked = {p: c for p, c in self.cells.items() if self.defenses[c.defense].defense == "watermark"}
        runs = {f"own/{p.stem}": (str(p), str(p)) for p in marked if not _unmarked(p)}
        suspects = [(self.victim(*v), v[0]) for v in sorted(self.independent)]
        suspects += [(str(p), c.dataset) for p, c in self.cells.items() if self.defenses[c.defense].defense == "none"]
        for path, cell in marked.items():
            what = {cell.attack + (f"-{cell.label}-{cell.pool}" if cell.pool else "")}
            if cell.pool and cell.pool == self.seen.get(cell.dataset):
                what.add(f"{cell.attack}-{cell.label}-{SEEN}")
            if cell.seed not in evidence_seeds or not what & evidence:
                continue
            for suspect, dataset in suspects:
                if dataset == cell.dataset:
                    runs[f"independent/{Path(suspect).stem}--{path.stem}"] = (suspect, str(path))
        return dict(sorted(runs.items()))

    def verification(self, name: str) -> dict[str, str]:
        suspect, evidence = self.verifications[name]
        return dict(suspect=suspect, evidence=evidence, key=str(self.key))

    def verification_files(self, kind: str = "") -> list[str]:
        return [str(self.out / "verified" / f"{n}.h5") for n in self.verifications if n.startswith(kind)]

    def proof(self) -> list[str]:
        """The verification tables, when the study verifies."""
        return [str(self.out / "proof.md")] if self.verifications else []

    # --- paths -----------------------------------------------------------------------------------------------------
    def data(self, name: str) -> str:
        return str(self.out / "data" / f"{name}.h5")

    def victim(self, dataset: str, victim: str, seed: int | str) -> str:
        return str(self.out / "victims" / f"{dataset}-{victim}-s{seed}.h5")

    def stolen(self, cell: Cell) -> Path:
        defense = f"-{cell.defense}" if self.defense_in_names or cell.defense != "none" else ""
        answers = f"-{cell.label}-{cell.pool}" if cell.pool else ""
        return self.out / "stolen" / f"{cell.dataset}-{cell.victim}{defense}-s{cell.seed}-{cell.attack}{answers}.h5"

    def ood(self, dataset: str, victim: str) -> list[str]:
        """The victim's OOD sets, in the recipe's order."""
        recipe = self._recipe(victim)
        names = [self.resolve(n, dataset) for n in dict(recipe.per_dataset).get(dataset, recipe.ood)]
        if recipe.leave_one_out:
            names = [n for n in names if n != recipe.held_out and n not in self.same_task.get(dataset, [])]
        return names

    def victim_files(self) -> list[str]:
        return sorted(self.victim(*v) for v in self.victims)

    def stolen_files(self) -> list[str]:
        return sorted(str(p) for p in self.cells)

    def data_names(self) -> list[str]:
        names = {d for d, _, _ in self.victims} | {c.pool for c in self.cells.values() if c.pool}
        names |= {n for d, v, _ in self.victims for n in self.ood(d, v)}
        return sorted(names)

    def constraints(self) -> dict[str, str]:
        """Wildcard patterns: each name as listed, longest first, so that names with dashes split one way."""

        def one_of(names) -> str:
            return "|".join(re.escape(n) for n in sorted(set(names), key=lambda n: (-len(n), n)))

        data = set(self.data_names()) | set(self.datasets)
        return dict(
            dataset=one_of(data),
            victim=one_of(self.recipes),
            defense=one_of(self.defenses),
            attack=one_of(self.attacks),
            label="soft|hard",
            pool=one_of(data),
            seed=r"\d+",
            name=one_of(data),
        )

    def victims_of(self, stage: str) -> str:
        names = [n for n, r in self.recipes.items() if r.stage == stage]
        return "|".join(re.escape(n) for n in sorted(names, key=lambda n: (-len(n), n))) or "(?!)"

    # --- flags -----------------------------------------------------------------------------------------------------
    def stage_flags(self, stage: str) -> str:
        return self.flags.get(stage, "")

    def recipe_flags(self, victim: str) -> str:
        return self._recipe(victim).flags

    def defense_flags(self, defense: str) -> str:
        d = self.defenses[defense]
        key = [f"--watermark-key {self.key}"] if d.defense == "watermark" else []
        return " ".join([f"--defense {d.defense}"] + [f"--defense-param {k}={v}" for k, v in d.params] + key)

    def key_input(self, defense: str) -> list[str]:
        return [str(self.key)] if self.defenses[defense].defense == "watermark" else []

    def evaluate_flags(self) -> str:
        key = f"--watermark-key {self.key}" if self.key else ""
        return " ".join(f for f in (self.stage_flags("evaluate"), key) if f)

    def attack_flags(self, attack: str, dataset: str, pool: str | None) -> str:
        """--attack, --budget and the attack's own flags; --epochs unless taken from the pool (`steps`)."""
        a = self.attacks[attack]
        flags = [f"--attack {a.attack}"]
        if a.budget is not None:
            flags.append(f"--budget {a.budget}")
        epochs = (
            a.epochs_unseen if a.epochs_unseen is not None and pool and pool != self.seen.get(dataset) else a.epochs
        )
        if epochs is not None:
            flags.append(f"--epochs {epochs}")
        if a.flags:
            flags.append(a.flags)
        return " ".join(flags)

    def epochs_from_steps(self, attack: str, pool_file: str) -> str:
        """`--epochs` giving about `steps` SGD steps of batch 128 on the transfer set: knockoff asks at most one
        query per pool image, so a small pool needs more epochs for the same number of steps. Read from the
        prepared pool when the cell runs; a dry run, before the pool exists, shows the rule instead."""
        a = self.attacks[attack]
        if a.steps is None:
            return ""
        if not Path(pool_file).exists():
            return f"--epochs <{a.steps} steps on {Path(pool_file).name}>"
        import h5py

        with h5py.File(pool_file, "r") as f:
            n = min(a.budget or math.inf, len(f["train/labels"]))
        return f"--epochs {max(1, math.ceil(a.steps * 128 / n))}"

    # --- the last rules and the cluster ----------------------------------------------------------------------------
    def prepare_args(self, name: str) -> str:
        return " ".join(f for f in (self.prepare_flags.get(name, ""), self.stage_flags("prepare")) if f)

    def benchmark(self) -> list[str]:
        return [str(self.config["benchmark"])] if self.config.get("benchmark") else []

    def summary_flag(self) -> str:
        return SUMMARIES[self.summary]

    def published(self) -> list[str]:
        """`<publish>-report.md` and `<publish>-tables.md` when the study publishes (e.g. docs/results/grid)."""
        prefix = self.config.get("publish")
        return [f"{prefix}-report.md", f"{prefix}-tables.md"] if prefix else []

    def publish(self, report: str, tables: str) -> None:
        """Copy the report (its plots renamed `<prefix>-<plot>.png`, and its links with them) and the tables."""
        report_out, tables_out = (Path(p) for p in self.published())
        prefix = Path(self.config["publish"]).name + "-"
        report_out.parent.mkdir(parents=True, exist_ok=True)
        for plot in sorted(Path(report).glob("*.png")):
            shutil.copyfile(plot, report_out.parent / (prefix + plot.name))
        text = re.sub(r"\]\(([^)/]+\.png)\)", lambda m: f"]({prefix}{m[1]})", (Path(report) / "report.md").read_text())
        report_out.write_text(text)
        shutil.copyfile(tables, tables_out)

    def threads(self, rule: str) -> int:
        return int(self._resources(rule).get("threads", 1))

    def resources(self, rule: str) -> dict:
        """What a job of the rule asks a cluster for (mem_mb, runtime in minutes, gpu, slurm_partition, ...): the
        study's `resources` over these defaults. Locally only --cores (and --resources, if given) bound the jobs."""
        spec = {**RESOURCES.get(rule, {}), **self._resources(rule)}
        spec.pop("threads", None)
        if spec.get("gpu") and "slurm_partition" not in spec and self.config.get("gpu_partition"):
            spec["slurm_partition"] = str(self.config["gpu_partition"])  # set by the SLURM profile
        return spec

    def _resources(self, rule: str) -> dict:
        return dict((self.config.get("resources") or {}).get(rule) or {})

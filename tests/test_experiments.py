"""The experiment workflow (experiments/Snakefile): every study's DAG has the cells its configuration names (dry
runs, locally and against the SLURM profile, with no SLURM installed), the grid's smoke study runs end to end into
a report, a finished study reruns nothing, a deleted cell is remade alone with what depends on it, and a killed run
leaves nothing a later run takes for finished. Real MNIST from the shared data folder."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import has_raw

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "experiments" / "Snakefile")]
CONFIG = ROOT / "experiments" / "config"
needs_mnist = pytest.mark.skipif(not has_raw("MNIST"), reason="no raw MNIST (see the end of the test report)")
pytest.importorskip("snakemake", reason="the experiments extra is not installed")


def snakemake(cwd: Path, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run Snakemake in `cwd` (relative study folders land there, and so does its .snakemake metadata)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def planned(cwd: Path, *args: str) -> Counter:
    """The jobs a dry run would run, per rule (empty when there is nothing to do)."""
    out = snakemake(cwd, *args, "--dry-run").stdout
    stats = out.partition("Job stats:")[2]
    jobs = Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)})
    if not jobs:
        assert "Nothing to be done" in out, out[-2000:]
    return jobs


def commands(cwd: Path, *args: str) -> dict[str, list[str]]:
    """Each planned CLI call of a dry run, by the file it writes: its tokens after `cli.py`."""
    out = snakemake(cwd, *args, "--dry-run").stdout
    return {m[2]: m[1].split() for m in re.finditer(r"cli\.py (.*?) --out (\S+) >", out)}


def flag(tokens: list[str], name: str) -> str:
    return tokens[tokens.index(name) + 1]


# Expected jobs per rule, from the dimensions each configuration states (counted by hand, not by the workflow).
# grid: 2 datasets x 3 seeds; each: 3 victims (undefended and AM by train, InI by train-ini), knockoff on the seen
# pool for 8 pairs x soft/hard less top1's soft answer (15), on skimage-patches for 3 pairs x 2 (6), jbda and DFME
# for those 3 pairs (6); data: mnist, fashionmnist, skimage-patches.
EXPECTED = {
    "grid": dict(
        prepare=3,
        train=2 * 3 * 2,
        train_ini=2 * 3,
        steal=2 * 3 * (15 + 6),
        steal_own_queries=2 * 3 * 6,
        evaluate=1,
        summarise=1,
        publish=1,
        all=1,
    ),
    # grid-smoke: the grid's cells for mnist and seed 0, the generated pool as the unseen one
    "grid-smoke": dict(
        prepare=3, train=2, train_ini=1, steal=15 + 6, steal_own_queries=6, evaluate=1, summarise=1, all=1
    ),
    # lofo: per dataset, 4 broad victims a seed (MNIST: 3 held-out families + all, sklearn-digits being its task;
    # FashionMNIST: 4 held out) x 3 seeds, plus undefended (every seed), faithful and AM on the reference seeds
    # (MNIST 0-1, FashionMNIST 0). Cells: broad 2 x 3 seeds x 4 pools x 2 labels (48, undefended names); references
    # 3 dataset-seeds x 4 pools x 2 labels x faithful+undefended (48); baselines 3 x 4 x (6 defenses x 2 - top1 soft)
    "lofo": dict(
        prepare=5,
        train=2 * 3 + 3,
        train_ini=2 * 4 * 3 + 3,
        steal_undefended=48 + 48,
        steal=3 * 4 * (6 * 2 - 1),
        evaluate=1,
        summarise=1,
        publish=1,
        all=1,
    ),
    "lofo-smoke": dict(
        prepare=5,
        train=2,
        train_ini=4 + 1,
        steal_undefended=4 * 2 + 4 * 2 * 2,
        steal=4 * 2 * 2,
        evaluate=1,
        summarise=1,
        all=1,
    ),
    # variants: 9 victims x sklearn-digits x soft/hard on seed 0; 6 victims soft on seeds 1-2; the references'
    # seen-pool cells (2 victims x 2 labels) and hard labels on seed 1 (2)
    "variants": dict(
        prepare=3,
        train=2 * 3,
        train_ini=7 + 4 * 2,
        steal_undefended=9 * 2 + 6 * 2 + 4 + 2,
        evaluate=1,
        summarise=1,
        publish=1,
        all=1,
    ),
    "variants-smoke": dict(prepare=3, train=2, train_ini=7, steal_undefended=9, evaluate=1, summarise=1, all=1),
    # near: per MNIST seed, 4 near victims (3 held-out families + all), the paper recipe and broad; cells: the held-out
    # families and Latin letters x soft/hard (8), undefended/faithful/broad x 4 pools x 2 (24), and the decision
    # table's operating points against the Latin letters: reverse sigmoid, MAD-argmax, AM and the gate around the
    # undefended victim and the gate around near-all, soft (5), and all but MAD-argmax hard (4); per FashionMNIST
    # seed, 3 near victims, the paper recipe and broad; cells 3 x 2 (6), 3 victims x 3 pools x 2 (18), and the
    # operating points against the silhouettes (4 soft, 3 hard). Seed 0 adds the sweeps: the gate's 6 settings x 2
    # victims x 2 labels less the 4 at 1 % (20), reverse sigmoid, MAD-argmax and AM at 3, 4 and 3 settings, soft,
    # and AM hard, less the 3 operating points, per dataset (10 + 10), and MAD, GRAD², noise and rounding at one
    # setting each, soft, per dataset (4 + 4); AM's victim per seed; data: 2 + 3 far + 6 near
    "near": dict(
        prepare=11,
        train=3 * 4,
        train_ini=3 * (6 + 5),
        steal=3 * (41 + 31) + 20 + 10 + 10 + 4 + 4,
        evaluate=1,
        summarise=1,
        all=1,
    ),
    # decide, per dataset (MNIST, FashionMNIST): seed 0; soft: none, 9 swept defenses x 6 (incl. AM's), faithful,
    # broad, near, gamma x 3, epsilon x 2 (63); hard: none, rs-gamma x 6, top1, AM x 6, the 8 InI victims (22); 8
    # operating points (4 InI and undefended victims, 4 defenses' picks): the three adaptive thieves x seen pool and
    # Latin letters, soft (48), knockoff on the Latin letters x soft/hard (16), jbda and dfme (16); 7 of them x
    # soft/hard on seeds 1-2 (28) and the 2 hard-label cells seed 0 lacked (gate, MAD-argmax); the adaptive thieves
    # against the 8 on seeds 1-2, both pools (96, with the paper recipe's victims of those seeds); each defense's
    # seed-0 pick for knockoff on the seen pool on seeds 1-2: MNIST 7 soft, 4 hard (with the epsilon 10,000
    # victims of those seeds), FashionMNIST 10 soft, 3 hard (48); FashionMNIST's own 4 picks on seed 0: the adaptive
    # thieves x 2 pools, knockoff on the Latin letters x soft/hard (32); data: mnist, fashionmnist, latin-letters
    "decide": dict(
        prepare=3,
        train=2 * 2 * 3,
        train_ini=2 * (8 + 2 * 2 + 2) + 2,
        steal=2 * (63 + 22 + 48 + 16 + 28 + 2 + 96) + 2 * (7 + 4 + 10 + 3) + 4 * (3 * 2 + 2),
        steal_own_queries=2 * 16,
        evaluate=1,
        summarise=1,
        all=1,
    ),
    # proof, per dataset on seed 0: undefended and near victims, and 8 independent victims (2 architectures x 4
    # seeds); watermark cells: knockoff x 2 labels x 2 pools x 2 victims (8) and JBDA x 2 victims x 3 seeds (6);
    # cells through no defense: knockoff x 2 x 2 x 2 victims (8); seeds 1-2 of both victims, knockoff x 2 labels on
    # the letters (8); knockoff-confident and seeded soft x 2 pools x 2 victims x 3 seeds (24). MNIST alone, on 3
    # seeds: a LeNet-5-BN thief x 2 labels on the letters x 2 victims (4), the voting thieves (average, majority)
    # hard x 2 pools x 2 victims (8), 3 prefixes hard on the letters x 2 victims (6); MNIST alone on seed 0: the
    # ResNet-18, VGG-16 and 300-step LeNet-5 thieves soft on the letters x 2 victims (6); DFME x 2 victims x 3 seeds
    # (6 per dataset); verify: every watermark cell against itself (52 per dataset + 3 x 18 + 6 on MNIST) and 16
    # unmarked suspects (8 victims, 8 cells) against the hard letters thieves of seed 0's 2 victims (32 per
    # dataset); data: mnist, fashionmnist, latin-letters
    "proof": dict(
        prepare=3,
        watermark_key=1,
        train=2 * (1 + 8 + 2),
        train_ini=2 * (1 + 2),
        steal=2 * (8 + 8 + 8 + 24) + 3 * (4 + 8 + 6) + 6,
        steal_own_queries=2 * 2 * 3 * 2,
        verify=2 * (52 + 32) + 3 * 18 + 6,
        proof=1,
        evaluate=1,
        summarise=1,
        all=1,
    ),
    # cifar10: 3 seeds x (undefended, InI) x 4 pairs x 2 labels; data: cifar10, cifar100, tinyimagenet
    "cifar10": dict(prepare=3, train=3, train_ini=3, steal=3 * 4 * 2, evaluate=1, summarise=1, all=1),
    "cifar10-smoke": dict(prepare=2, train=1, train_ini=1, steal=4 * 2, evaluate=1, summarise=1, all=1),
}


@pytest.mark.parametrize("profile", ["local", "slurm"])
@pytest.mark.parametrize("study", sorted(EXPECTED))
def test_dry_run_plans_every_cell_of_the_study(study, profile, tmp_path):
    slurm = ["--profile", str(ROOT / "experiments" / "profiles" / "slurm")] if profile == "slurm" else []
    publish = ["--config", f"publish={tmp_path}/docs/{study}"] if "publish" in EXPECTED[study] else []
    jobs = planned(tmp_path, "--configfile", str(CONFIG / f"{study}.yaml"), *publish, *slurm)
    expected = Counter(EXPECTED[study])
    assert jobs == expected + Counter(total=sum(expected.values()))


def test_a_run_narrowed_to_one_dataset_skips_the_blocks_of_the_other(tmp_path):
    """near's Latin-letter blocks name the victim trained on every near family, which only MNIST has: a FashionMNIST
    run plans FashionMNIST's cells alone (the counts of the near study's, FashionMNIST's half)."""
    jobs = planned(tmp_path, "--configfile", str(CONFIG / "near.yaml"), "--config", "datasets=[fashionmnist]")
    assert (jobs["train"], jobs["train_ini"], jobs["steal"]) == (2 * 3, 5 * 3, 31 * 3 + 10 + 4)


def test_cells_carry_the_drivers_flags(tmp_path):
    """Leave-one-out victims train on every family but the one they are attacked with; option victims carry their
    option; knockoff's epochs follow from the pool (read once the pool exists)."""
    lofo = commands(tmp_path, "--configfile", str(CONFIG / "lofo-smoke.yaml"))
    ood = {
        Path(out).stem: flag(cmd, "--ood").split(",")
        for out, cmd in lofo.items()
        if "/victims/" in out and "--ood" in cmd
    }
    data = "artifacts/lofo-smoke/data/{}.h5".format
    assert ood["mnist-broad-no-generated-s0"] == [data("fashionmnist"), data("skimage-patches")]
    assert ood["mnist-broad-no-fashionmnist-s0"] == [data("skimage-patches"), data("generated")]
    assert ood["mnist-broad-all-s0"] == [data("fashionmnist"), data("skimage-patches"), data("generated")]
    assert ood["mnist-faithful-s0"] == ood["mnist-am-s0"] == [data("fashionmnist")]
    attacked = {Path(out).stem: Path(flag(cmd, "--victim")).stem for out, cmd in lofo.items() if "/stolen/" in out}
    assert attacked["mnist-broad-all-s0-knockoff-soft-sklearn-digits"] == "mnist-broad-all-s0"
    assert attacked["mnist-broad-no-generated-s0-knockoff-hard-generated"] == "mnist-broad-no-generated-s0"
    assert all(flag(lofo[out], "--preset") == "broad" for out in lofo if "/victims/mnist-broad-" in out)

    variants = commands(tmp_path, "--configfile", str(CONFIG / "variants-smoke.yaml"))
    joint = variants["artifacts/variants-smoke/victims/mnist-ini-bn-joint-s0.h5"]
    assert (flag(joint, "--arch"), flag(joint, "--bn-mode"), flag(joint, "--compile")) == ("lenet5_bn", "joint", "off")
    assert flag(variants["artifacts/variants-smoke/victims/mnist-undefended-bn-s0.h5"], "--arch") == "lenet5_bn"

    # sweeps: a defense over its strength, InI victims over a train-ini option; one file per point, named by it
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "victims:\n  ini-g: {stage: train-ini, ood: [seen], options: {gamma: [0.1, 1.0]}}\n"
        "defenses:\n  none: {}\n  mad: {params: {eps: [0.5, 1.1]}}\nalways_train: []\n"
        "cells:\n  - pairs: [undefended:mad, ini-g:none]\n"
        "    attacks: [knockoff]\n    labels: [soft]\n    pools: [seen]\n"
    )
    cells = commands(tmp_path, "--configfile", str(CONFIG / "grid-smoke.yaml"), str(sweep))
    stolen = {Path(out).name: cmd for out, cmd in cells.items() if "/stolen/" in out}
    assert sorted(stolen) == [
        "mnist-ini-g-gamma0.1-none-s0-knockoff-soft-fashionmnist.h5",
        "mnist-ini-g-gamma1.0-none-s0-knockoff-soft-fashionmnist.h5",
        "mnist-undefended-mad-eps0.5-s0-knockoff-soft-fashionmnist.h5",
        "mnist-undefended-mad-eps1.1-s0-knockoff-soft-fashionmnist.h5",
    ]
    assert flag(stolen["mnist-undefended-mad-eps0.5-s0-knockoff-soft-fashionmnist.h5"], "--defense-param") == "eps=0.5"
    assert flag(cells["artifacts/grid-smoke/victims/mnist-ini-g-gamma0.1-s0.h5"], "--gamma") == "0.1"


def test_the_proof_study_hands_the_key_to_the_watermark_cells_alone(tmp_path):
    """The study's key reaches every watermark cell, evaluate and verify, and no cell stolen through no defense;
    the unmarked suspects are checked against the marks of seed 0's evidence cells only."""
    cmds = commands(tmp_path, "--configfile", str(CONFIG / "proof.yaml"))
    key = "artifacts/proof/watermark.key"
    stolen = {Path(out).stem: cmd for out, cmd in cmds.items() if "/stolen/" in out}
    assert all(flag(cmd, "--watermark-key") == key for name, cmd in stolen.items() if "-watermark-" in name)
    assert all("--watermark-key" not in cmd for name, cmd in stolen.items() if "-none-" in name)
    verified = {out.split("/verified/")[1]: cmd for out, cmd in cmds.items() if "/verified/" in out}
    assert all(flag(cmd, "--key") == key for cmd in verified.values())
    own = verified["own/mnist-near-watermark-s0-jbda.h5"]
    assert flag(own, "--suspect") == flag(own, "--evidence") == "artifacts/proof/stolen/mnist-near-watermark-s0-jbda.h5"
    evidence = {Path(flag(cmd, "--evidence")).stem for name, cmd in verified.items() if name.startswith("independent")}
    assert evidence == {
        f"{d}-{v}-watermark-s0-knockoff-{label}-{pool}"
        for d in ("mnist", "fashionmnist")
        for v in ("undefended", "near")
        for label, pool in (("hard", "latin-letters"),)
    }
    suspects = {flag(cmd, "--suspect") for name, cmd in verified.items() if name.startswith("independent/mnist")}
    assert "artifacts/proof/victims/mnist-undefended-bn-s13.h5" in suspects
    assert not any("-watermark-" in s for s in suspects)


def test_a_configuration_naming_nothing_it_defines_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cells:\n  - pairs: [undefended:no-such]\n    attacks: [knockoff]\n")
    run = snakemake(tmp_path, "--configfile", str(CONFIG / "grid-smoke.yaml"), str(bad), "--dry-run", check=False)
    assert run.returncode != 0 and "defense 'no-such' is not in `defenses`" in run.stderr + run.stdout
    assert not (tmp_path / "artifacts").exists()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """The grid's smoke study, run once, two jobs side by side; its folder."""
    if not has_raw("MNIST"):
        pytest.skip("no raw MNIST (see the end of the test report)")
    cwd = tmp_path_factory.mktemp("smoke")
    snakemake(cwd, "--configfile", str(CONFIG / "grid-smoke.yaml"), "--cores", "2")
    return cwd


@needs_mnist
def test_smoke_study_runs_end_to_end_into_a_report(smoke):
    out = smoke / "artifacts" / "grid-smoke"
    stolen = sorted(p.name for p in (out / "stolen").glob("*.h5"))
    assert len(stolen) == EXPECTED["grid-smoke"]["steal"] + EXPECTED["grid-smoke"]["steal_own_queries"]
    assert "mnist-undefended-top1-s0-knockoff-hard-fashionmnist.h5" in stolen
    assert "mnist-undefended-top1-s0-knockoff-soft-fashionmnist.h5" not in stolen  # top1 answers labels only
    for name in stolen:  # each file is the cell its name says
        with h5py.File(out / "stolen" / name) as f:
            params = json.loads(f.attrs["params"])
            assert f.attrs["queries"] <= f.attrs["budget"]
        dataset, rest = name.split("-", 1)
        victim = Path(params["victim"]).stem
        assert victim.startswith(dataset) and name.startswith(victim.removesuffix("-s0"))
        assert f"-{params['defense']}-s{params['seed']}-{params['attack']}" in name
        if params["attack"] == "knockoff":
            assert name.endswith(f"-{params['label']}-{Path(params['pool']).stem}.h5")
    with h5py.File(out / "metrics.h5") as f:
        assert len(f["rows/file"]) == len(stolen) + 3  # and the three victims alone
        assert np.isfinite(f["rows/stealing_accuracy"][: len(stolen)]).all()
    report = (out / "report" / "report.md").read_text()
    assert "| mnist |" in report and (out / "report" / "tradeoff-knockoff.png").stat().st_size > 0
    table = (out / "tables.md").read_text().splitlines()
    assert table[0].startswith("| dataset | victim | defense | benign (as deployed) |")
    # a row per (victim, defense) pair, and the AM victim alone, undefended
    assert len([row for row in table if row.startswith("| mnist |")]) == 8 + 1


@needs_mnist
def test_finished_study_reruns_nothing_and_a_deleted_cell_alone(smoke):
    config = ["--configfile", str(CONFIG / "grid-smoke.yaml")]
    assert planned(smoke, *config) == Counter()
    out = smoke / "artifacts" / "grid-smoke"
    cell = out / "stolen" / "mnist-undefended-reverse-sigmoid-s0-knockoff-soft-fashionmnist.h5"
    with h5py.File(cell) as f:
        weights = {k: v[()] for k, v in f["weights"].items()}
    others = {p: p.stat().st_mtime_ns for p in out.glob("*/*.h5") if p != cell}
    cell.unlink()
    assert planned(smoke, *config) == Counter(steal=1, evaluate=1, summarise=1, all=1, total=4)
    snakemake(smoke, *config, "--cores", "2")
    with h5py.File(cell) as f:  # the same command and seed: the same surrogate
        assert all(np.array_equal(f["weights"][k][()], v) for k, v in weights.items())
    assert {p: p.stat().st_mtime_ns for p in others} == others  # nothing else was remade
    assert planned(smoke, *config) == Counter()


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*SNAKEMAKE, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for(path: Path, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@needs_mnist
@pytest.mark.parametrize("killed", ["everything", "snakemake alone"])
def test_killed_run_leaves_nothing_taken_for_finished(smoke, killed):
    """A run killed while a cell trains: either its job dies too (the stage's `.partial` file is never an output),
    or the job outlives Snakemake and writes its file, which Snakemake then knows as incomplete and redoes."""
    config = ["--configfile", str(CONFIG / "grid-smoke.yaml")]
    out = smoke / "artifacts" / "grid-smoke"
    name = "mnist-ini-none-s0-dfme" if killed == "everything" else "mnist-am-adaptive-misinformation-s0-dfme"
    cell, log = out / "stolen" / f"{name}.h5", out / "logs" / f"{name}.log"
    cell.unlink()
    log.unlink()
    run = _start(smoke, *config, "--cores", "1", str(cell.relative_to(smoke)))
    _wait_for(log)  # the job's shell has started
    if killed == "everything":
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        time.sleep(2)
        assert not cell.exists()
    else:
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        _wait_for(cell)  # the orphaned job finishes and renames its file into place
        time.sleep(1)
    snakemake(smoke, *config, "--unlock")  # the killed run's lock on the folder
    jobs = planned(smoke, *config)
    assert jobs["steal_own_queries"] == 1 and jobs["evaluate"] == 1
    snakemake(smoke, *config, "--cores", "2")
    with h5py.File(cell) as f:
        assert f.attrs["queries"] == f.attrs["budget"] and "weights" in f
    assert not list(out.glob("*/*.partial"))
    assert planned(smoke, *config) == Counter()


@needs_mnist
def test_leave_one_family_out_smoke_study_and_its_table(tmp_path):
    snakemake(tmp_path, "--configfile", str(CONFIG / "lofo-smoke.yaml"), "--cores", "2")
    out = tmp_path / "artifacts" / "lofo-smoke"
    victims = sorted(p.stem for p in (out / "victims").glob("*.h5"))
    # one broad victim per trainable held-out family, plus the one trained on all (sklearn-digits: same task)
    assert victims == [
        "mnist-am-s0",
        "mnist-broad-all-s0",
        "mnist-broad-no-fashionmnist-s0",
        "mnist-broad-no-generated-s0",
        "mnist-broad-no-skimage-patches-s0",
        "mnist-faithful-s0",
        "mnist-undefended-s0",
    ]
    with h5py.File(out / "victims/mnist-broad-no-generated-s0.h5") as f:
        ood = json.loads(f.attrs["params"])["ood"]
    assert "generated" not in ood and "skimage-patches" in ood and "fashionmnist" in ood
    stolen = sorted(p.name for p in (out / "stolen").glob("*.h5"))
    assert len(stolen) == 4 * 5 * 2  # 4 pool families x (broad, undefended, faithful, 2 baselines) x soft/hard
    with h5py.File(out / "stolen/mnist-am-adaptive-misinformation-s0-knockoff-soft-generated.h5") as f:
        params = json.loads(f.attrs["params"])
    assert params["defense"] == "adaptive-misinformation" and params["victim"].endswith("mnist-am-s0.h5")
    table = (out / "tables.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| mnist |")]
    families = ["fashionmnist", "generated", "skimage-patches", "sklearn-digits", "**mean over families**"]
    assert [r.split(" | ")[1] for r in rows[:5]] == families
    assert all(r.count("(1)") == 6 for r in rows[:5])  # 3 victims x soft/hard, one seed each
    assert "reverse-sigmoid soft / hard | adaptive-misinformation soft / hard |" in table
    assert [r.split(" | ")[1] for r in rows[5:10]] == families
    assert all(r.count("(1)") == 4 for r in rows[5:10])  # 2 baselines x soft/hard
    assert (out / "report" / "report.md").stat().st_size > 0


@needs_mnist
def test_options_study_tabulates_benign_diagnostics_and_theft(tmp_path):
    """The options study's chain on three of its victims (the rest are the same rules with other flags)."""
    few = tmp_path / "few.yaml"
    few.write_text(
        "cells:\n  - pairs: [undefended:none, faithful:none, ini-kl-attacker:none]\n"
        "    attacks: [knockoff]\n    labels: [soft]\n    pools: [sklearn-digits]\n"
    )
    snakemake(tmp_path, "--configfile", str(CONFIG / "variants-smoke.yaml"), str(few), "--cores", "2")
    out = tmp_path / "artifacts" / "variants-smoke"
    with h5py.File(out / "victims/mnist-ini-kl-attacker-s0.h5") as f:
        params = json.loads(f.attrs["params"])
    assert (params["kl_direction"], params["compile_mode"], params["diagnostic_images"]) == ("attacker", "off", 64)
    rows = [
        line.strip("| ").split(" | ")
        for line in (out / "tables.md").read_text().splitlines()
        if line.startswith("| mnist |")
    ]
    assert [r[1] for r in rows] == ["undefended", "faithful", "faithful kl_direction=attacker"]
    for r in rows:
        defended = r[1] != "undefended"
        assert (r[3] != "-" and r[4] != "-") if defended else (r[3] == r[4] == "-"), r  # diagnostics: InI only
        assert r[5].endswith("(1) / -"), r  # soft stealing from one seed; no hard labels asked

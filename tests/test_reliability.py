"""Reliability and security: SIGKILL mid-write and mid-run, exact resume, no code run on load, divergence,
memory estimates, and determinism. Subprocesses run `cli.py` for real; everything else runs in-process."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke
from tiny_data import write_dataset

from models.params import UserError
from stages.attacks import blackbox as _blackbox
from stages.core import artifacts as _artifacts
from stages.core.artifacts import load_state, open_artifact, sha256
from stages.data import prepared as _data
from stages.training import jit as _jit
from stages.training import loop as _loop
from stages.training import victim as _victim

REPO = Path(__file__).resolve().parents[1]
TRAIN = ("train", "--epochs", 2, "--batch-size", 32, "--device", "cpu")

# `python cli.py ...` that stops at a chosen moment, touches a marker file and waits to be killed; the test
# SIGKILLs it there, so the kill lands at the same point every run.
STALLING_CLI = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
from stages.training import loop as _loop
from stages.attacks import checkpoint as _steal_checkpoint
from stages.training import victim as _victim
marker, stall = os.environ["INI_TEST_MARKER"], os.environ["INI_TEST_STALL"]

def hold():
    open(marker, "w").close()
    time.sleep(300)

def stall_after_epoch(module, name, epoch):  # the first checkpoint written after that epoch (or steal's slice)
    write = getattr(module, name)
    def stalling(*args, **kwargs):  # (path, fingerprint, epoch, ...), by position or by keyword
        write(*args, **kwargs)
        if kwargs.get("epoch", args[2] if len(args) > 2 else None) == epoch:
            hold()
    setattr(module, name, stalling)

if stall.startswith("after-checkpoint-of-epoch-"):
    epoch = int(stall.rsplit("-", 1)[1])
    stall_after_epoch(_loop, "_write_checkpoint", epoch)  # train, train-ini
    stall_after_epoch(_steal_checkpoint, "write", epoch)
elif stall == "mid-write":  # half of the victim's tensors are in <out>.partial, on disk
    save_state = _victim.save_state
    def stalling(group, state):
        if group.name == "/weights":
            keys = list(state)
            save_state(group, {k: state[k] for k in keys[: len(keys) // 2]})
            group.file.flush()
            hold()
        save_state(group, state)
    _victim.save_state = stalling
sys.argv = ["cli.py", *sys.argv[1:]]
import cli
cli.app()
"""


def run_until_stall(stall: str, args: tuple, tmp_path: Path) -> None:
    """Start the CLI in a subprocess, wait until it reaches `stall`, then SIGKILL it."""
    marker = tmp_path / f"{stall}.reached"
    env = dict(os.environ, INI_TEST_MARKER=str(marker), INI_TEST_STALL=stall, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    log = tmp_path / f"{stall}.log"  # a file, not a pipe: a full pipe would block the run
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", STALLING_CLI, *map(str, args)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before {stall}: {log.read_text()[-2000:]}")
            if time.time() > deadline:
                pytest.fail(f"no {stall} within 240 s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def weights(path: Path) -> dict[str, torch.Tensor]:
    with h5py.File(path, "r") as f:
        return load_state(f["weights"])


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------- SIGKILL


def test_sigkill_mid_write_keeps_previous_artifact_and_no_partial_is_accepted(tiny, tmp_path, one_thread):
    out = tmp_path / "victim.h5"
    assert invoke(*TRAIN, "--dataset", tiny, "--seed", 1, "--out", out).exit_code == 0
    previous = sha256(out)

    run_until_stall("mid-write", (*TRAIN, "--dataset", tiny, "--out", out), tmp_path)

    assert sha256(out) == previous
    _victim.load(out)  # still a whole, readable victim
    partial = out.with_name(out.name + ".partial")
    assert partial.exists()  # a SIGKILL leaves it; no reader may take it
    with pytest.raises(UserError, match="unfinished write"):
        open_artifact(partial, "victim")
    line = assert_one_line_error(invoke("export", "--victim", partial, "--out", tmp_path / "v.pt"))
    assert "unfinished write" in line and not (tmp_path / "v.pt").exists()
    (tmp_path / "v.pt.partial").write_bytes(b"PK")  # the TorchScript reader refuses unfinished files too
    with pytest.raises(UserError, match="unfinished write"):
        _jit.load(tmp_path / "v.pt.partial")
    (tmp_path / "v.pt.partial").unlink()

    # The next run overwrites the stale partial and leaves none behind.
    result = invoke(*TRAIN, "--dataset", tiny, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert sha256(out) != previous and not partial.exists()


def test_sigkill_after_first_checkpoint_then_resume_equals_uninterrupted(tiny, tmp_path, one_thread):
    full = tmp_path / "full.h5"
    assert invoke(*TRAIN, "--dataset", tiny, "--out", full).exit_code == 0

    out = tmp_path / "resumed.h5"
    out.write_bytes(b"a previous artifact")  # whatever was at --out survives the kill
    run_until_stall("after-checkpoint-of-epoch-1", (*TRAIN, "--dataset", tiny, "--out", out), tmp_path)
    assert out.read_bytes() == b"a previous artifact"
    ckpt = _loop.checkpoint_path(out)
    with open_artifact(ckpt, "checkpoint") as f:
        assert f.attrs["epoch"] == 1
    assert not list(tmp_path.glob("*.partial"))

    result = invoke(*TRAIN, "--dataset", tiny, "--out", out, "--resume")
    assert result.exit_code == 0, result.stderr
    assert_same_weights(full, out)
    a, b = _victim.load(full)[1], _victim.load(out)[1]
    assert a.history["val_accuracy"] == b.history["val_accuracy"] and a.history["train_loss"] == b.history["train_loss"]
    assert a.chosen_epoch == b.chosen_epoch and not ckpt.exists()


@pytest.mark.parametrize("clip", ["official", "spike"])
def test_train_ini_sigkill_after_first_checkpoint_then_resume_equals_uninterrupted(clip, tiny, tmp_path, one_thread):
    ood = write_dataset(tmp_path / "ood.h5", name="ood", shape=(3, 32, 32), seed=3)
    args = (
        "train-ini",
        "--dataset",
        tiny,
        "--ood",
        ood,
        "--epochs",
        2,
        "--batch-size",
        64,
        "--diagnostic-images",
        32,
        "--device",
        "cpu",
        "--clip",
        clip,
    )
    full = tmp_path / "full.h5"
    assert invoke(*args, "--out", full).exit_code == 0

    out = tmp_path / "resumed.h5"
    run_until_stall("after-checkpoint-of-epoch-1", (*args, "--out", out), tmp_path)
    ckpt = _loop.checkpoint_path(out)
    with open_artifact(ckpt, "checkpoint") as f:
        assert f.attrs["epoch"] == 1
        if clip == "spike":  # the running mean of gradient norms is training state: in the checkpoint
            assert f["modules/spike_clip/steps"][()] == 3 and f["modules/spike_clip/mean"][()] > 0
    assert not out.exists()

    result = invoke(*args, "--out", out, "--resume")
    assert result.exit_code == 0, result.stderr
    a, b = _contents(full), _contents(out)
    for key in ("@params", "@train_seconds", "history/epoch_seconds"):
        a.pop(key), b.pop(key)
    _assert_same_contents(a, b)  # weights, frozen surrogates, every loss term and diagnostic
    assert "ini_surrogate0/net.fc.weight" in a and not ckpt.exists()


# Every attack -> its flags, and the evaluation (epoch; dfme: budget slice) whose checkpoint the run is killed after
STEAL_RESUMES = {
    "knockoff": (("--attack", "knockoff", "--pool", "{tiny}", "--budget", 120, "--epochs", 3, "--batch-size", 32), 1),
    # killed in round 2 of 3: after its augmentation, its queries and one of its two epochs
    "jbda": (
        (
            "--attack",
            "jbda",
            "--pool",
            "{tiny}",
            "--budget",
            200,
            "--epochs",
            2,
            "--batch-size",
            32,
            "--attack-param",
            "seeds=20",
            "--attack-param",
            "rounds=3",
        ),
        3,
    ),
    # killed at the end of round 1: the resumed run augments (random targets, surrogate in eval mode) first
    "jbda-tr": (
        (
            "--attack",
            "jbda-tr",
            "--pool",
            "{tiny}",
            "--budget",
            200,
            "--epochs",
            2,
            "--batch-size",
            32,
            "--attack-param",
            "seeds=20",
            "--attack-param",
            "rounds=2",
        ),
        2,
    ),
    "adaptive": (("--attack", "adaptive", "--pool", "{tiny}", "--budget", 150, "--epochs", 2, "--batch-size", 32), 1),
    # killed at the end of phase 1's training: the resumed run picks phase 2's pool images in the restored
    # surrogate's feature space
    "knockoff-confident": (
        (
            "--attack",
            "knockoff-confident",
            "--pool",
            "{tiny}",
            "--budget",
            120,
            "--epochs",
            2,
            "--batch-size",
            32,
            "--attack-param",
            "explore=0.5",
            "--attack-param",
            "min_score=0",
            "--attack-param",
            "keep=0.5",
        ),
        2,
    ),
    # killed at the end of round 1: the resumed run moves round 2's candidates with the restored surrogate
    "confidence-search": (
        (
            "--attack",
            "confidence-search",
            "--pool",
            "{tiny}",
            "--budget",
            120,
            "--epochs",
            2,
            "--batch-size",
            32,
            "--attack-param",
            "rounds=3",
            "--attack-param",
            "min_score=0",
        ),
        2,
    ),
    # the labelled batches draw from the thief's generator between the pool batches
    "seeded": (
        (
            "--attack",
            "seeded",
            "--pool",
            "{tiny}",
            "--budget",
            120,
            "--epochs",
            3,
            "--batch-size",
            32,
            "--attack-param",
            "seeds=30",
        ),
        1,
    ),
    # 112 queries per iteration, slices of 60: slices 2 and 3 end in the same iteration, killed between them
    "dfme": (
        (
            "--attack",
            "dfme",
            "--budget",
            300,
            "--epochs",
            5,
            "--batch-size",
            16,
            "--attack-param",
            "width=8",
            "--attack-param",
            "noise_dim=16",
        ),
        2,
    ),
}


@pytest.mark.parametrize("attack", STEAL_RESUMES)
def test_steal_sigkill_after_a_checkpoint_then_resume_equals_uninterrupted(
    attack, tiny, victim, tmp_path, monkeypatch, one_thread
):
    flags, epoch = STEAL_RESUMES[attack]
    args = (
        "steal",
        "--victim",
        victim,
        *(tiny if f == "{tiny}" else f for f in flags),
        "--query-batch",
        40,
        "--device",
        "cpu",
    )
    full = tmp_path / "full.h5"
    result = invoke(*args, "--out", full)
    assert result.exit_code == 0, result.stderr

    out = tmp_path / "resumed.h5"
    run_until_stall(f"after-checkpoint-of-epoch-{epoch}", (*args, "--out", out), tmp_path)
    ckpt = _loop.checkpoint_path(out)
    with open_artifact(ckpt, "checkpoint") as f:
        assert f.attrs["epoch"] == epoch and f.attrs["stage"] == "steal"
        spent = int(f.attrs["queries"])
        assert len(f["transfer/images"]) == spent > 0
    assert not out.exists()

    asked = []
    call = _blackbox.BlackBox.__call__

    def counting(box, images):
        answers = call(box, images)
        asked.append(len(answers))
        return answers

    monkeypatch.setattr(_blackbox.BlackBox, "__call__", counting)
    result = invoke(*args, "--out", out, "--resume")
    assert result.exit_code == 0, result.stderr
    a, b = _contents(full), _contents(out)
    a.pop("@params"), b.pop("@params")  # they name --out
    _assert_same_contents(a, b)  # weights, history, the transfer set, queries spent, every summary number
    assert sum(asked) == a["@queries"] - spent  # what the killed run spent is never asked again
    assert not ckpt.exists() and not list(tmp_path.glob("*.partial"))


# ---------------------------------------------------------------------------------------------- no code on load


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle(path: Path, marker: Path, protocol: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"weights": RunsCode(marker)}, protocol=protocol))
    return path


def _torch_save(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": RunsCode(marker)}, path)
    return path


def _cifar_source(folder: Path, marker: Path) -> Path:
    for name in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    ):
        _pickle(folder / name, marker)
    return folder


def _checkpoint(tmp: Path, marker: Path) -> Path:
    _pickle(_loop.checkpoint_path(tmp / "out.h5"), marker)
    return tmp / "out.h5"


OFFERS = {
    "victim-pickle": lambda tmp, m, tiny, victim: (
        "export",
        "--victim",
        _pickle(tmp / "evil.pth", m),
        "--out",
        tmp / "out.pt",
    ),
    "victim-pickle-protocol-0": lambda tmp, m, tiny, victim: (
        "export",
        "--victim",
        _pickle(tmp / "evil.h5", m, 0),
        "--out",
        tmp / "out.pt",
    ),
    "victim-torch-save": lambda tmp, m, tiny, victim: (
        "export",
        "--victim",
        _torch_save(tmp / "evil.pt", m),
        "--out",
        tmp / "out.pt",
    ),
    "dataset-pickle": lambda tmp, m, tiny, victim: (
        *TRAIN,
        "--dataset",
        _pickle(tmp / "evil.h5", m),
        "--out",
        tmp / "out.h5",
    ),
    "checkpoint-pickle": lambda tmp, m, tiny, victim: (
        *TRAIN,
        "--dataset",
        tiny,
        "--resume",
        "--out",
        _checkpoint(tmp, m),
    ),
    "cifar-batches": lambda tmp, m, tiny, victim: (
        "prepare",
        "--dataset",
        "cifar10",
        "--source",
        _cifar_source(tmp / "c", m),
        "--no-download",
        "--out",
        tmp / "out.h5",
    ),
    "steal-victim-pickle": lambda tmp, m, tiny, victim: (
        "steal",
        "--victim",
        _pickle(tmp / "evil.h5", m),
        "--pool",
        tiny,
        "--out",
        tmp / "out.h5",
    ),
    "steal-victim-torch-save-as-pt": lambda tmp, m, tiny, victim: (
        "steal",
        "--victim",
        _torch_save(tmp / "evil.pt", m),
        "--pool",
        tiny,
        "--out",
        tmp / "out.h5",
    ),
    "steal-pool-pickle": lambda tmp, m, tiny, victim: (
        "steal",
        "--victim",
        victim,
        "--pool",
        _pickle(tmp / "pool.h5", m),
        "--out",
        tmp / "out.h5",
    ),
    "steal-checkpoint-pickle": lambda tmp, m, tiny, victim: (
        "steal",
        "--victim",
        victim,
        "--pool",
        tiny,
        "--device",
        "cpu",
        "--resume",
        "--out",
        _checkpoint(tmp, m),
    ),
}


@pytest.mark.parametrize("offer", OFFERS)
def test_a_pickle_that_runs_code_is_refused_and_never_run(offer, tiny, victim, tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "self-test")))  # the payload really works when unpickled
    assert (tmp_path / "self-test").exists()

    line = assert_one_line_error(invoke(*OFFERS[offer](tmp_path, marker, tiny, victim)))
    assert not marker.exists()
    assert re.search(r"pickle|refused|not a readable HDF5|not a TorchScript file", line), line
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.pt").exists()


def test_torch_load_would_refuse_it_too(tmp_path):
    """If a stage ever needs torch.load, weights_only=True (enforced below) refuses the payload."""
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(_torch_save(tmp_path / "evil.pt", marker), weights_only=True)
    assert not marker.exists()


# every Python file of the product and its tools, subpackages included
SOURCES = [
    REPO / "cli.py",
    *(p for folder in ("stages", "models", "benchmarks", "experiments") for p in sorted((REPO / folder).rglob("*.py"))),
]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_loader_in_the_code(path):
    """Weights come from HDF5; a torch.load must say weights_only=True; pickle/np.load(allow_pickle) never appear;
    TorchScript files (programs) are loaded only in stages/training/jit.py."""
    code = path.read_text()
    for call in re.finditer(r"torch\.load\(", code):
        args = code[call.end() : call.end() + 300]
        assert "weights_only=True" in args.split("\n\n")[0], f"{path.name}: torch.load without weights_only=True"
    assert not re.search(r"\bpickle\.loads?\(|cPickle|dill\.|joblib\.load|allow_pickle\s*=\s*True", code), path.name
    if path.relative_to(REPO) != Path("stages/training/jit.py"):
        assert not re.search(r"torch\.jit\.load\(", code), (
            f"{path.name}: TorchScript loads belong in stages/training/jit.py"
        )


# ---------------------------------------------------------------------------------------------- divergence


def test_nan_loss_at_epoch_2_stops_keeps_epoch_1_checkpoint_and_resume_finishes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "victim.h5"
    epoch = {"now": 0}
    make_generator, to_float = _loop.epoch_generator, _data.to_float

    def tracking(seed, e):
        epoch["now"] = e
        return make_generator(seed, e)

    def poisoned(images):  # from the second epoch on, every image the loop sees is NaN
        x = to_float(images)
        return x.fill_(float("nan")) if epoch["now"] >= 1 else x

    monkeypatch.setattr(_loop, "epoch_generator", tracking)
    monkeypatch.setattr(_data, "to_float", poisoned)
    result = invoke(*TRAIN, "--epochs", 3, "--dataset", tiny, "--out", out)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert "diverged at epoch 2" in errors[0] and "last good checkpoint kept" in errors[0]
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    with open_artifact(_loop.checkpoint_path(out), "checkpoint") as f:
        assert f.attrs["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in load_state(f["model"]).values())

    monkeypatch.undo()  # the data is healthy again: resume from the kept checkpoint
    result = invoke(*TRAIN, "--epochs", 3, "--dataset", tiny, "--out", out, "--resume")
    assert result.exit_code == 0, result.stderr
    assert len(_victim.load(out)[1].history["val_accuracy"]) == 3


def test_absurd_learning_rate_diverges_with_one_line(tiny, tmp_path):
    out = tmp_path / "victim.h5"
    result = invoke(*TRAIN, "--dataset", tiny, "--lr", 1e30, "--out", out)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: training diverged at epoch 1")
    assert not out.exists() and not _loop.checkpoint_path(out).exists()


# ---------------------------------------------------------------------------------------------- memory


@pytest.fixture
def meminfo(tmp_path, monkeypatch):
    """Pretend the machine has `kb` kB available."""

    def set_available(kb: int) -> None:
        path = tmp_path / "meminfo"
        path.write_text(f"MemTotal:       {kb * 4} kB\nMemFree:        {kb} kB\nMemAvailable:   {kb} kB\n")
        monkeypatch.setattr(_artifacts, "MEMINFO", path)

    return set_available


def test_check_memory_reads_memavailable(meminfo, monkeypatch, tmp_path):
    meminfo(2 * 1024 * 1024)  # 2 GiB
    assert _artifacts.available_memory() == 2 * 1024**3
    _artifacts.check_memory(10**9, "a small job")
    with pytest.raises(UserError, match=r"a big job needs ~5\.0 GB, only 2\.1 GB available"):
        _artifacts.check_memory(5 * 10**9, "a big job")
    monkeypatch.setattr(_artifacts, "MEMINFO", tmp_path / "absent")  # no /proc/meminfo: no check
    assert _artifacts.available_memory() is None
    _artifacts.check_memory(10**15, "anything")


def test_reading_a_dataset_larger_than_memory_fails_early(meminfo, tiny, tmp_path):
    meminfo(100)  # 100 kB; the tiny set's images alone are 188 kB
    out = tmp_path / "victim.h5"
    line = assert_one_line_error(invoke(*TRAIN, "--dataset", tiny, "--out", out))
    assert re.search(r"reading .*synth\.h5 needs ~0\.2 MB, only 0\.1 MB available", line), line
    assert not out.exists()


def test_prepare_checks_memory_before_converting(meminfo, tmp_path):
    meminfo(20_000)  # 20 MB: enough for the raw 8x8 digits, not for 1,797 RGB images of 128x128 (2 copies)
    out = tmp_path / "digits.h5"
    line = assert_one_line_error(
        invoke("prepare", "--dataset", "sklearn-digits", "--size", 128, "--channels", 3, "--out", out)
    )
    assert "preparing 1,797 sklearn-digits images of 3x128x128 needs ~176.7 MB, only 20.5 MB" in line, line
    assert not out.exists()


def test_steal_checks_the_transfer_set_fits_before_querying(meminfo, tiny, victim, tmp_path):
    meminfo(1_000)  # 1 MB; 10,000 queries of 1x28x28 float32 images and 10 answers need 31.8 MB
    out = tmp_path / "surrogate.h5"
    line = assert_one_line_error(
        invoke("steal", "--victim", victim, "--pool", tiny, "--budget", 10_000, "--device", "cpu", "--out", out)
    )
    assert "steal: a transfer set of 10,000 queries needs ~31.8 MB, only 1.0 MB" in line, line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- determinism


def _contents(path: Path) -> dict:
    """Every dataset and attribute of an HDF5 file except the clock's."""
    items = {}
    with h5py.File(path, "r") as f:
        for key, value in f.attrs.items():
            if key not in ("created_utc", "wall_seconds"):
                items[f"@{key}"] = np.asarray(value).tolist()
        f.visititems(lambda name, obj: items.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return items


def _assert_same_contents(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_prepare_twice_gives_identical_files(tmp_path):
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.h5")
        result = invoke("prepare", "--dataset", "sklearn-digits", "--limit", 400, "--seed", 7, "--out", paths[-1])
        assert result.exit_code == 0, result.stderr
    a, b = _contents(paths[0]), _contents(paths[1])
    a.pop("@params"), b.pop("@params")  # they name the output path
    _assert_same_contents(a, b)
    assert a["@seed"] == 7 and json.loads(a["@versions"])["torch"] == torch.__version__


def test_train_and_export_twice_give_identical_weights_history_and_outputs(tiny, tmp_path):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name / "victim.h5"
        assert invoke(*TRAIN, "--dataset", tiny, "--seed", 5, "--out", out).exit_code == 0
        result = invoke("export", "--victim", out, "--check-images", 16)
        assert result.exit_code == 0, result.stderr
        scripted, meta = _jit.load(Path(result.stdout.strip()))
        assert str(meta["victim_provenance"]["seed"]) == "5"
        assert meta["versions"]["torch"] == torch.__version__
        with torch.no_grad():
            outputs.append(scripted(torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))))
        contents = _contents(out)
        for key in [k for k in contents if k.startswith("history/epoch_seconds") or k in ("@params", "@train_seconds")]:
            contents.pop(key)
        outputs.append(contents)
    assert torch.equal(outputs[0], outputs[2])
    _assert_same_contents(outputs[1], outputs[3])
    assert outputs[1]["@seed"] == 5

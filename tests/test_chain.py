"""The foundation chain prepare -> train -> export through the CLI, on a slice of real MNIST."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke

from stages.core.artifacts import load_state
from stages.training import jit as _jit
from stages.training import loop as _loop
from stages.training import victim as _victim


def test_prepare_writes_disjoint_self_describing_splits(mnist_small):
    with h5py.File(mnist_small, "r") as f:
        assert f.attrs["schema"] == "dataset/1"
        assert f.attrs["name"] == "mnist"
        assert (
            json.loads(f.attrs["classes"]) == [str(i) for i in range(10)] or len(json.loads(f.attrs["classes"])) == 10
        )
        assert list(f.attrs["mean"]) == pytest.approx([0.1307]) and list(f.attrs["std"]) == pytest.approx([0.3081])
        inputs = json.loads(f.attrs["inputs"])
        assert inputs and all(len(i["sha256"]) == 64 for i in inputs)
        assert {"torch", "torchvision", "h5py", "numpy", "python"} <= set(json.loads(f.attrs["versions"]))
        sizes = {s: len(f[s]["labels"]) for s in ("train", "val", "test")}
        assert sizes == {"train": 800, "val": 200, "test": 200}
        for split in ("train", "val", "test"):
            assert f[split]["images"].dtype == np.uint8 and f[split]["images"].shape[1:] == (1, 28, 28)
            assert f[split]["labels"].dtype == np.int64
        train_idx, val_idx = set(f["train/index"][()]), set(f["val/index"][()])
        assert not train_idx & val_idx and train_idx | val_idx == set(range(1000))


def test_prepare_is_deterministic_and_seeded(tmp_path):
    outs = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        result = invoke("prepare", "--dataset", "sklearn-digits", "--seed", seed, "--out", tmp_path / f"{name}.h5")
        assert result.exit_code == 0, result.stderr
        with h5py.File(tmp_path / f"{name}.h5", "r") as f:
            outs.append(f["val/index"][()])
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_prepare_converts_size_and_channels(tmp_path):
    out = tmp_path / "digits32.h5"
    result = invoke("prepare", "--dataset", "sklearn-digits", "--size", 32, "--channels", 3, "--out", out)
    assert result.exit_code == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f["train/images"].shape[1:] == (3, 32, 32)
        assert len(f.attrs["mean"]) == 3


def test_chain_train_export(mnist_small, tmp_path):
    victim = tmp_path / "v" / "victim.h5"  # a missing folder is created
    result = invoke("train", "--dataset", mnist_small, "--epochs", 3, "--batch-size", 16, "--out", victim)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(victim)
    assert not _loop.checkpoint_path(victim).exists()

    model, info = _victim.load(victim)
    assert info.arch == "lenet5" and info.objective == "ce" and info.dataset == "mnist"
    history = info.history
    assert len(history["val_accuracy"]) == 3 and len(history["train_loss"]) == 3
    assert history["train_loss"][-1] < history["train_loss"][0]
    # Chosen on val, never on test: the chosen epoch is the first with the best val accuracy.
    best = int(np.argmax(history["val_accuracy"]))
    assert info.chosen_epoch == best + 1 and info.test_accuracy == history["test_accuracy"][best]
    assert info.test_accuracy > 0.8  # 3 epochs on 800 real MNIST images

    result = invoke("export", "--victim", victim)
    assert result.exit_code == 0, result.stderr
    pt = victim.with_suffix(".pt")
    assert result.stdout.strip() == str(pt)
    scripted, meta = _jit.load(pt)
    assert meta["arch"] == "lenet5" and meta["defense"] == "none" and meta["input_shape"] == [1, 28, 28]
    x = torch.rand(5, 1, 28, 28)
    probs = scripted(x)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-6)
    assert torch.allclose(probs, torch.softmax(model(x), 1), atol=1e-6)


def test_same_seed_same_weights(mnist_small, tmp_path):
    states = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.h5"
        result = invoke("train", "--dataset", mnist_small, "--epochs", 1, "--out", out, "--seed", 3)
        assert result.exit_code == 0, result.stderr
        with h5py.File(out, "r") as f:
            states.append(load_state(f["weights"]))
            assert f.attrs["seed"] == 3
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resume_equals_uninterrupted(mnist_small, tmp_path, monkeypatch):
    full = tmp_path / "full.h5"
    assert invoke("train", "--dataset", mnist_small, "--epochs", 2, "--out", full).exit_code == 0

    resumed = tmp_path / "resumed.h5"
    original = _loop._write_checkpoint

    def crash_after_first_epoch(path, fingerprint, epoch, *args):
        original(path, fingerprint, epoch, *args)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(_loop, "_write_checkpoint", crash_after_first_epoch)
    assert invoke("train", "--dataset", mnist_small, "--epochs", 2, "--out", resumed).exit_code != 0
    assert _loop.checkpoint_path(resumed).exists() and not resumed.exists()
    monkeypatch.setattr(_loop, "_write_checkpoint", original)

    result = invoke("train", "--dataset", mnist_small, "--epochs", 2, "--out", resumed, "--resume")
    assert result.exit_code == 0, result.stderr
    with h5py.File(full, "r") as a, h5py.File(resumed, "r") as b:
        wa, wb = load_state(a["weights"]), load_state(b["weights"])
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert np.array_equal(a["history/val_accuracy"][()], b["history/val_accuracy"][()])


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "wrong-schema",
        "unknown-dataset",
        "unknown-arch",
        "resume-without-checkpoint",
        "empty",
        "under-a-file",
        "export-wrong-schema",
        "export-missing",
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(case, mnist_small, tmp_path):
    out = tmp_path / "victim.h5"
    args = {
        "missing": ("train", "--dataset", tmp_path / "nope.h5", "--out", out),
        "wrong-schema": ("train", "--dataset", _write_victim_like(tmp_path), "--out", out),
        "unknown-dataset": ("prepare", "--dataset", "imagenet-21k", "--out", out),
        "unknown-arch": ("train", "--dataset", mnist_small, "--arch", "alexnet", "--out", out),
        "resume-without-checkpoint": ("train", "--dataset", mnist_small, "--resume", "--out", out),
        "empty": ("train", "--dataset", _empty(tmp_path), "--out", out),
        "under-a-file": ("train", "--dataset", mnist_small, "--out", _empty(tmp_path) / "victim.h5"),
        "export-wrong-schema": ("export", "--victim", mnist_small, "--out", out),
        "export-missing": ("export", "--victim", tmp_path / "nope.h5", "--out", out),
    }[case]
    assert_one_line_error(invoke(*args))
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_nothing_offline_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setenv("INI_DATA_ROOT", str(tmp_path))
    line = assert_one_line_error(
        invoke("prepare", "--dataset", "cifar10", "--data-root", tmp_path, "--no-download", "--out", tmp_path / "c.h5")
    )
    assert "cifar" in line.lower()
    assert not (tmp_path / "c.h5").exists()


def _write_victim_like(tmp_path):
    path = tmp_path / "fake.h5"
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "victim/1"
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.h5"
    path.touch()
    return path


def test_export_that_fails_its_check_keeps_the_previous_file(victim, tmp_path, monkeypatch):
    from stages import export

    pt = tmp_path / "victim.pt"
    pt.write_bytes(b"the previous deployment")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no graph can pass: the check must fail
    line = assert_one_line_error(invoke("export", "--victim", victim, "--out", pt))
    assert "differs from the eager model" in line
    assert pt.read_bytes() == b"the previous deployment" and not list(tmp_path.glob("*.partial"))

"""Bad input, stage by stage: each case must fail with exactly one line `error: ...` on stderr, a non-zero exit
code, no traceback, and no output (nor `.partial`) left behind. Data is hand-made (tests/tiny_data.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_one_line_error, invoke
from tiny_data import replace, write_dataset

from stages.training import loop as _loop


@dataclass
class Case:
    tmp: Path
    tiny: Path
    victim: Path
    out: Path

    def data(self, edit=None, **kw) -> Path:
        return write_dataset(self.tmp / "bad.h5", edit=edit, **kw)

    def copy_victim(self, edit) -> Path:
        path = self.tmp / "bad-victim.h5"
        shutil.copy(self.victim, path)
        with h5py.File(path, "r+") as f:
            edit(f)
        return path

    def file(self, name: str, content: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content)
        return path

    def truncated(self, source: Path) -> Path:
        content = source.read_bytes()
        return self.file("truncated.h5", content[: len(content) // 2])

    def regular_file(self) -> Path:
        return self.file("a-file", b"not a folder")

    def read_only_folder(self) -> Path:
        """A folder writes really fail in. Root ignores chmod, so root gets /sys (a read-only mount here)."""
        if os.geteuid() != 0:
            folder = self.tmp / "read-only"
            folder.mkdir()
            folder.chmod(0o555)
            return folder
        try:
            tempfile.TemporaryFile(dir="/sys").close()
        except OSError:
            return Path("/sys")
        pytest.skip("running as root and /sys is writable: no folder refuses root's writes")


def _set(attr, value):
    def edit(f):
        f.attrs[attr] = value

    return edit


def _replace(name, make):
    def edit(f):
        replace(f, name, make(f[name][()]))

    return edit


def _delete(name):
    def edit(f):
        if name in f:
            del f[name]
        else:
            del f.attrs[name]

    return edit


def _unfinished(c: Case) -> Path:
    path = c.tmp / "synth.h5.partial"
    shutil.copy(c.tiny, path)
    return path


def _stale_checkpoint(c: Case) -> Path:
    """A checkpoint beside --out that was made with other parameters."""
    ckpt = _loop.checkpoint_path(c.out)
    shutil.copy(c.victim, ckpt)
    with h5py.File(ckpt, "r+") as f:
        f.attrs["schema"] = "checkpoint/1"
        f.attrs["params"] = '{"fingerprint": "made with other parameters"}'
    return ckpt


def _damaged_checkpoint(c: Case) -> Path:
    ckpt = _loop.checkpoint_path(c.out)
    with h5py.File(ckpt, "w") as f:
        f.attrs["schema"] = "checkpoint/1"
    return ckpt


TRAIN = ("train", "--epochs", 1, "--batch-size", 32, "--device", "cpu")

# id -> builder(case) -> CLI arguments. Every builder passes --out c.out (or a path that must not appear).
CASES = {
    # prepare
    "prepare-unknown-dataset": lambda c: ("prepare", "--dataset", "imagenet-21k", "--out", c.out),
    "prepare-channels-2": lambda c: ("prepare", "--dataset", "sklearn-digits", "--channels", 2, "--out", c.out),
    "prepare-size-too-small": lambda c: ("prepare", "--dataset", "sklearn-digits", "--size", 4, "--out", c.out),
    "prepare-limit-zero": lambda c: ("prepare", "--dataset", "sklearn-digits", "--limit", 0, "--out", c.out),
    "prepare-val-size-negative": lambda c: ("prepare", "--dataset", "sklearn-digits", "--val-size", -1, "--out", c.out),
    "prepare-val-size-beyond-train": lambda c: (
        "prepare",
        "--dataset",
        "sklearn-digits",
        "--limit",
        50,
        "--val-size",
        50,
        "--out",
        c.out,
    ),
    "prepare-source-missing": lambda c: ("prepare", "--dataset", "mnist", "--source", c.tmp / "nope", "--out", c.out),
    "prepare-source-without-files": lambda c: (
        "prepare",
        "--dataset",
        "cifar10",
        "--source",
        c.tmp,
        "--no-download",
        "--out",
        c.out,
    ),
    "prepare-truncated-idx": lambda c: (
        "prepare",
        "--dataset",
        "mnist",
        "--source",
        _truncated_idx(c),
        "--no-download",
        "--out",
        c.out,
    ),
    "prepare-source-for-builtin": lambda c: ("prepare", "--dataset", "generated", "--source", c.tmp, "--out", c.out),
    "prepare-out-under-a-file": lambda c: (
        "prepare",
        "--dataset",
        "sklearn-digits",
        "--out",
        c.regular_file() / "d.h5",
    ),
    "prepare-out-read-only": lambda c: (
        "prepare",
        "--dataset",
        "sklearn-digits",
        "--out",
        c.read_only_folder() / "d.h5",
    ),
    # train: the dataset file
    "train-missing-file": lambda c: (*TRAIN, "--dataset", c.tmp / "nope.h5", "--out", c.out),
    "train-empty-file": lambda c: (*TRAIN, "--dataset", c.file("empty.h5", b""), "--out", c.out),
    "train-truncated-hdf5": lambda c: (*TRAIN, "--dataset", c.truncated(c.tiny), "--out", c.out),
    "train-text-file": lambda c: (*TRAIN, "--dataset", c.file("notes.h5", b"images: lots\n"), "--out", c.out),
    "train-unfinished-partial": lambda c: (*TRAIN, "--dataset", _unfinished(c), "--out", c.out),
    "train-no-schema": lambda c: (*TRAIN, "--dataset", c.data(_delete("schema")), "--out", c.out),
    "train-wrong-schema": lambda c: (*TRAIN, "--dataset", c.victim, "--out", c.out),
    "train-future-schema": lambda c: (*TRAIN, "--dataset", c.data(_set("schema", "dataset/99")), "--out", c.out),
    "train-missing-split": lambda c: (*TRAIN, "--dataset", c.data(_delete("val")), "--out", c.out),
    "train-missing-classes": lambda c: (*TRAIN, "--dataset", c.data(_delete("classes")), "--out", c.out),
    "train-zero-std": lambda c: (*TRAIN, "--dataset", c.data(_set("std", [0.0])), "--out", c.out),
    "train-nan-mean": lambda c: (*TRAIN, "--dataset", c.data(_set("mean", [np.nan])), "--out", c.out),
    "train-float-images": lambda c: (
        *TRAIN,
        "--dataset",
        c.data(_replace("train/images", lambda x: x / 255.0)),
        "--out",
        c.out,
    ),
    "train-nan-images": lambda c: (*TRAIN, "--dataset", c.data(_replace("train/images", _with_nan)), "--out", c.out),
    "train-inf-images": lambda c: (*TRAIN, "--dataset", c.data(_replace("test/images", _with_inf)), "--out", c.out),
    "train-int16-images-out-of-range": lambda c: (
        *TRAIN,
        "--dataset",
        c.data(_replace("train/images", lambda x: x.astype(np.int16) * 4)),
        "--out",
        c.out,
    ),
    "train-images-without-channels": lambda c: (
        *TRAIN,
        "--dataset",
        c.data(_replace("train/images", lambda x: x[:, 0])),
        "--out",
        c.out,
    ),
    "train-two-channel-images": lambda c: (
        *TRAIN,
        "--dataset",
        c.data(_replace("train/images", lambda x: np.concatenate([x, x], 1))),
        "--out",
        c.out,
    ),
    "train-splits-differ-in-shape": lambda c: (
        *TRAIN,
        "--dataset",
        c.data(_replace("test/images", lambda x: np.zeros((len(x), 1, 32, 32), np.uint8))),
        "--out",
        c.out,
    ),
    "train-labels-out-of-range": lambda c: (
        *TRAIN,
        "--dataset",
        c.data(_replace("train/labels", lambda y: y + 1)),
        "--out",
        c.out,
    ),
    "train-negative-labels": lambda c: (
        *TRAIN,
        "--dataset",
        c.data(_replace("val/labels", lambda y: y - 1)),
        "--out",
        c.out,
    ),
    "train-float-labels": lambda c: (
        *TRAIN,
        "--dataset",
        c.data(_replace("train/labels", lambda y: y + 0.5)),
        "--out",
        c.out,
    ),
    "train-label-count-mismatch": lambda c: (
        *TRAIN,
        "--dataset",
        c.data(_replace("train/labels", lambda y: y[:-1])),
        "--out",
        c.out,
    ),
    "train-empty-train-split": lambda c: (*TRAIN, "--dataset", c.data(_empty_train), "--out", c.out),
    # train: flags
    "train-unknown-dataset": lambda c: (*TRAIN, "--dataset", "imagenet-21k", "--out", c.out),
    "train-unknown-arch": lambda c: (*TRAIN, "--dataset", c.tiny, "--arch", "alexnet", "--out", c.out),
    "train-zero-epochs": lambda c: ("train", "--dataset", c.tiny, "--epochs", 0, "--out", c.out),
    "train-negative-epochs": lambda c: ("train", "--dataset", c.tiny, "--epochs", -3, "--out", c.out),
    "train-zero-batch-size": lambda c: ("train", "--dataset", c.tiny, "--batch-size", 0, "--out", c.out),
    "train-negative-lr": lambda c: ("train", "--dataset", c.tiny, "--lr", -0.1, "--out", c.out),
    "train-momentum-above-one": lambda c: ("train", "--dataset", c.tiny, "--momentum", 1.5, "--out", c.out),
    "train-epochs-not-a-number": lambda c: ("train", "--dataset", c.tiny, "--epochs", "ten", "--out", c.out),
    "train-unknown-device": lambda c: ("train", "--dataset", c.tiny, "--device", "tpu", "--out", c.out),
    "train-unknown-option": lambda c: ("train", "--dataset", c.tiny, "--epoch", 1, "--out", c.out),
    # train: resume and output
    "train-resume-without-checkpoint": lambda c: (*TRAIN, "--dataset", c.tiny, "--resume", "--out", c.out),
    "train-resume-other-parameters": lambda c: (
        _stale_checkpoint(c),
        (*TRAIN, "--dataset", c.tiny, "--resume", "--out", c.out),
    )[1],
    "train-resume-damaged-checkpoint": lambda c: (
        _damaged_checkpoint(c),
        (*TRAIN, "--dataset", c.tiny, "--resume", "--out", c.out),
    )[1],
    "train-out-under-a-file": lambda c: (*TRAIN, "--dataset", c.tiny, "--out", c.regular_file() / "victim.h5"),
    "train-out-is-a-folder": lambda c: (*TRAIN, "--dataset", c.tiny, "--out", c.tmp),
    "train-out-read-only": lambda c: (*TRAIN, "--dataset", c.tiny, "--out", c.read_only_folder() / "victim.h5"),
    # export
    "export-missing-victim": lambda c: ("export", "--victim", c.tmp / "nope.h5", "--out", c.out),
    "export-empty-victim": lambda c: ("export", "--victim", c.file("empty.h5", b""), "--out", c.out),
    "export-truncated-victim": lambda c: ("export", "--victim", c.truncated(c.victim), "--out", c.out),
    "export-dataset-as-victim": lambda c: ("export", "--victim", c.tiny, "--out", c.out),
    "export-future-schema": lambda c: (
        "export",
        "--victim",
        c.copy_victim(_set("schema", "victim/99")),
        "--out",
        c.out,
    ),
    "export-victim-lacks-arch": lambda c: ("export", "--victim", c.copy_victim(_delete("arch")), "--out", c.out),
    "export-unknown-arch-in-victim": lambda c: (
        "export",
        "--victim",
        c.copy_victim(_set("arch", "alexnet")),
        "--out",
        c.out,
    ),
    "export-weights-of-wrong-shape": lambda c: (
        "export",
        "--victim",
        c.copy_victim(_replace("weights/net.fc.bias", lambda b: np.zeros(3, b.dtype))),
        "--out",
        c.out,
    ),
    "export-nan-weights": lambda c: (
        "export",
        "--victim",
        c.copy_victim(_replace("weights/net.fc.weight", lambda w: np.full_like(w, np.nan))),
        "--out",
        c.out,
    ),
    "export-data-of-another-dataset": lambda c: (
        "export",
        "--victim",
        c.victim,
        "--data",
        c.data(name="other"),
        "--out",
        c.out,
    ),
    "export-data-of-another-shape": lambda c: (
        "export",
        "--victim",
        c.victim,
        "--data",
        c.data(shape=(3, 32, 32)),
        "--out",
        c.out,
    ),
    "export-data-missing": lambda c: ("export", "--victim", c.victim, "--data", c.tmp / "nope.h5", "--out", c.out),
    "export-unknown-defense": lambda c: ("export", "--victim", c.victim, "--defense", "magic", "--out", c.out),
    "export-zero-check-images": lambda c: ("export", "--victim", c.victim, "--check-images", 0, "--out", c.out),
    "export-out-under-a-file": lambda c: ("export", "--victim", c.victim, "--out", c.regular_file() / "victim.pt"),
    "export-out-read-only": lambda c: ("export", "--victim", c.victim, "--out", c.read_only_folder() / "victim.pt"),
    "export-mad-negative-eps": lambda c: (
        "export",
        "--victim",
        c.victim,
        "--defense",
        "mad",
        "--defense-param",
        "eps=-0.1",
        "--out",
        c.out,
    ),
    "export-defense-param-not-a-number": lambda c: (
        "export",
        "--victim",
        c.victim,
        "--defense",
        "rounding",
        "--defense-param",
        "decimals=two",
        "--out",
        c.out,
    ),
    "export-defense-param-unknown": lambda c: (
        "export",
        "--victim",
        c.victim,
        "--defense",
        "rounding",
        "--defense-param",
        "digits=2",
        "--out",
        c.out,
    ),
    # steal
    "steal-unknown-attack": lambda c: (*_steal(c), "--attack", "smash", "--out", c.out),
    "steal-zero-budget": lambda c: (*_steal(c), "--budget", 0, "--out", c.out),
    "steal-negative-budget": lambda c: (*_steal(c), "--budget", -5, "--out", c.out),
    "steal-missing-victim": lambda c: ("steal", "--victim", c.tmp / "nope.h5", "--pool", c.tiny, "--out", c.out),
    "steal-dataset-as-victim": lambda c: ("steal", "--victim", c.tiny, "--pool", c.tiny, "--out", c.out),
    "steal-victim-pt-not-torchscript": lambda c: (
        "steal",
        "--victim",
        c.file("victim.pt", b"a text file"),
        "--pool",
        c.tiny,
        "--out",
        c.out,
    ),
    "steal-pool-missing": lambda c: ("steal", "--victim", c.victim, "--pool", c.tmp / "nope.h5", "--out", c.out),
    "steal-victim-as-pool": lambda c: ("steal", "--victim", c.victim, "--pool", c.victim, "--out", c.out),
    "steal-pool-with-float-images": lambda c: (
        "steal",
        "--victim",
        c.victim,
        "--pool",
        c.data(_replace("train/images", _with_nan)),
        "--out",
        c.out,
    ),
    "steal-unknown-defense": lambda c: (*_steal(c), "--defense", "magic", "--out", c.out),
    "steal-mad-negative-eps": lambda c: (*_steal(c), "--defense", "mad", "--defense-param", "eps=-0.1", "--out", c.out),
    "steal-unknown-attack-param": lambda c: (*_steal(c), "--attack-param", "nope=1", "--out", c.out),
    "steal-unknown-surrogate-arch": lambda c: (*_steal(c), "--arch", "alexnet", "--out", c.out),
    "steal-data-of-another-dataset": lambda c: (*_steal(c), "--data", c.data(name="other"), "--out", c.out),
    "steal-out-under-a-file": lambda c: (*_steal(c), "--out", c.regular_file() / "surrogate.h5"),
    "steal-resume-without-checkpoint": lambda c: (*_steal(c), "--resume", "--out", c.out),
    "steal-resume-other-parameters": lambda c: (_stale_checkpoint(c), (*_steal(c), "--resume", "--out", c.out))[1],
    "steal-resume-damaged-checkpoint": lambda c: (_damaged_checkpoint(c), (*_steal(c), "--resume", "--out", c.out))[1],
    # train-ini
    "ini-unknown-ood": lambda c: (*_ini(c), "--ood", "imagenet-21k", "--out", c.out),
    "ini-ood-missing-file": lambda c: (*_ini(c), "--ood", c.tmp / "nope.h5", "--out", c.out),
    "ini-ood-wrong-schema": lambda c: (*_ini(c), "--ood", c.victim, "--out", c.out),
    "ini-ood-truncated": lambda c: (*_ini(c), "--ood", c.truncated(c.tiny), "--out", c.out),
    "ini-negative-gamma": lambda c: (*_ini(c), "--ood", c.data(name="ood"), "--gamma", -1, "--out", c.out),
    "ini-zero-surrogates": lambda c: (*_ini(c), "--ood", c.data(name="ood"), "--surrogates", 0, "--out", c.out),
    "ini-unknown-surrogate-arch": lambda c: (
        *_ini(c),
        "--ood",
        c.data(name="ood"),
        "--surrogate-archs",
        "alexnet",
        "--out",
        c.out,
    ),
    "ini-resume-without-checkpoint": lambda c: (*_ini(c), "--ood", c.data(name="ood"), "--resume", "--out", c.out),
    # evaluate
    "evaluate-missing-file": lambda c: ("evaluate", c.tmp / "nope.h5", "--out", c.out),
    "evaluate-dataset-given": lambda c: ("evaluate", c.tiny, "--out", c.out),
    "evaluate-empty-file": lambda c: ("evaluate", c.file("empty.h5", b""), "--out", c.out),
    "evaluate-victim-on-other-data": lambda c: ("evaluate", c.victim, "--data", c.data(name="other"), "--out", c.out),
    "evaluate-bad-benchmark-json": lambda c: (
        "evaluate",
        c.victim,
        "--benchmark",
        c.file("bench.json", b"{"),
        "--out",
        c.out,
    ),
    # the CLI itself
    "unknown-command": lambda c: ("steal-everything", "--out", c.out),
}


def _ini(c: Case) -> tuple:
    return ("train-ini", "--dataset", c.tiny, "--epochs", 1, "--batch-size", 32, "--device", "cpu")


def _steal(c: Case) -> tuple:
    return ("steal", "--victim", c.victim, "--pool", c.tiny, "--budget", 20, "--device", "cpu")


def _with_nan(x):
    x = x.astype(np.float32) / 255
    x[0, 0, 0, 0] = np.nan
    return x


def _with_inf(x):
    x = x.astype(np.float32)
    x[-1, 0, -1, -1] = np.inf
    return x


def _empty_train(f):
    replace(f, "train/images", np.zeros((0, 1, 28, 28), np.uint8))
    replace(f, "train/labels", np.zeros(0, np.int64))


def _truncated_idx(c: Case) -> Path:
    """MNIST's four IDX files, each cut short (a download that died half-way)."""
    folder = c.tmp / "raw"
    folder.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        header = b"\x00\x00\x08\x03" if "images" in name else b"\x00\x00\x08\x01"
        (folder / name).write_bytes(header + (1000).to_bytes(4, "big") + b"\x1c" * 7)
    return folder


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_with_one_line_and_leaves_nothing(name, tiny, victim, tmp_path):
    case = Case(tmp_path, tiny, victim, tmp_path / "out.h5")
    args = CASES[name](case)
    before = {p for p in Path(victim).parent.iterdir()}
    try:
        line = assert_one_line_error(invoke(*args))
    finally:
        if (tmp_path / "read-only").exists():
            (tmp_path / "read-only").chmod(0o755)
    assert len(line) < 400, line  # a message, not a dump
    outputs = [Path(a) for a in args if isinstance(a, Path)]
    targets = [case.out] + [p for p in outputs if args[args.index(p) - 1] == "--out"]
    assert not any(t.exists() and t.is_file() for t in targets), [t for t in targets if t.exists()]
    assert not list(tmp_path.rglob("*.partial")) or name == "train-unfinished-partial"
    assert {p for p in Path(victim).parent.iterdir()} == before  # the shared victim's folder is untouched

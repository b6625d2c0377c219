"""The watermark and `verify`: marks are keyed, stable and rare; the key never reaches an artifact; a surrogate
stolen from the watermarked victim is named, one stolen from the same victim without marks is not; the evidence
is read from a transfer set and from the serving ledger; bad input fails in one line with nothing written."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke
from tiny_data import write_dataset

from models.defenses import Watermark, coarsen, key_fingerprint
from models.params import defaults
from stages.attacks import blackbox as _blackbox
from stages.data import prepared as _data
from stages.deploy import watermark_key
from stages.evaluation import metrics
from stages.provenance import evidence as _evidence
from stages.provenance import significance

KEY = b"a fixed test key, thirty-two b.."
# A strong marking for small data: every answer below top probability 1 is OOD-looking, and 30 % of them marked.
STRONG = ["--defense-param", "quantile=0", "--defense-param", "threshold=1", "--defense-param", "ood_rate=0.3"]


def watermark(**changes) -> Watermark:
    return Watermark(KEY, **{**defaults(Watermark.PARAMS), "quantile": 0.0, **changes}).eval()


def answers(n: int, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g).float() / 255.0
    return x, torch.softmax(torch.randn(n, k, generator=g) * 3.0, 1)


def test_marks_are_keyed_rare_and_never_the_top1():
    x, p = answers(20_000)
    d = watermark(rate=0.005, ood_rate=0.0)
    with torch.no_grad():
        out = d(x, p)
    moved = out.argmax(1) != p.argmax(1)
    marked, keyed, _ = d.marks(x, p)
    assert torch.equal(moved, torch.from_numpy(marked))
    assert 0.0035 < marked.mean() < 0.0065  # 100 expected, binomial sd 7
    assert (keyed != p.argmax(1).numpy()).all()
    assert torch.equal(out[moved].argmax(1), torch.from_numpy(keyed[marked]))
    assert torch.equal(d(x, p), out)  # the same image always gets the same answer
    other = Watermark(b"another key of thirty-two bytes.", **{**defaults(Watermark.PARAMS), "quantile": 0.0})
    other_marked, _, _ = other.marks(x, p)
    assert (other_marked & marked).sum() < 5  # another key marks other images


def test_ood_looking_answers_are_marked_at_their_own_rate_and_raise_keeps_the_label():
    x, p = answers(4000, seed=1)
    d = watermark(rate=0.0, ood_rate=0.5, threshold=0.6)
    marked, _, top = d.marks(x, p)
    low = top < 0.6
    assert not marked[~low].any()
    assert 0.45 < marked[low].mean() < 0.55
    r = watermark(rate=0.0, ood_rate=0.5, threshold=0.6, **{"raise": 1})
    with torch.no_grad():
        out = r(x, p)
    assert torch.equal(out.argmax(1), p.argmax(1))
    second = out.argsort(1, descending=True)[:, 1].numpy()
    assert (second[marked] == r.marks(x, p)[1][marked]).all()
    torch.testing.assert_close(out.sum(1), torch.ones(len(p)))


def test_a_sharpened_mark_gives_the_keyed_class_at_least_the_confidence_and_keeps_the_rest_in_proportion():
    x, p = answers(4000, seed=2)
    plain, sharp = (
        watermark(rate=0.0, ood_rate=0.5, threshold=0.9),
        watermark(rate=0.0, ood_rate=0.5, threshold=0.9, confidence=0.95),
    )
    with torch.no_grad():
        swapped, sharpened = plain(x, p), sharp(x, p)
    marked, keyed, _ = sharp.marks(x, p)
    assert 0.2 < marked.mean() < 0.5
    assert torch.equal(sharpened[~torch.from_numpy(marked)], p[~torch.from_numpy(marked)])
    rows, k = np.flatnonzero(marked), torch.from_numpy(keyed)
    lifted = sharpened[rows, k[rows]]
    assert (lifted >= 0.95 - 1e-6).all() and torch.equal(sharpened[rows].argmax(1), k[rows])
    torch.testing.assert_close(sharpened.sum(1), torch.ones(len(p)))
    others = torch.ones_like(p, dtype=torch.bool)
    others[rows, k[rows]] = False
    ratio = sharpened[rows][others[rows]].view(len(rows), -1) / swapped[rows][others[rows]].view(len(rows), -1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))  # one factor per answer: proportions kept


def test_coarsened_hash_ignores_what_stays_within_a_grey_level():
    x = np.full((1, 1, 28, 28), 100, np.uint8)
    assert np.array_equal(coarsen(x, 2, 16), coarsen(x + 3, 2, 16))  # 100 and 103 share level 6 of 16
    assert not np.array_equal(coarsen(x, 2, 16), coarsen(x + 20, 2, 16))
    assert coarsen(np.zeros((2, 3, 27, 27), np.uint8), 4, 8).shape == (2, 3, 7, 7)  # edges padded


def test_fisher_and_rank_tests_follow_the_null():
    """Marked and control answers drawn alike: p-values roughly uniform, none below 1e-3 in 200 draws."""
    rng = np.random.default_rng(0)
    ps = []
    for _ in range(200):
        probs = rng.dirichlet(np.ones(10), size=(80,))
        keyed = rng.integers(0, 10, 80)
        ps.append(significance.decide(probs[:40], keyed[:40], probs[40:], keyed[40:], "swap")[0].p_value)
    ps = np.array(ps)
    assert ps.min() > 1e-3 and 0.3 < np.median(ps) < 0.9  # twice the smaller of two p-values: median above 1/2
    learnt = np.eye(10)[keyed[:40]] * 0.9 + 0.01
    outcome = significance.decide(learnt, keyed[:40], probs[40:], keyed[40:], "swap")[0]
    assert outcome.marked_agree == 40 and outcome.p_value < 1e-15 and outcome.stolen


@pytest.fixture(scope="module")
def theft(victim, mnist_small, tmp_path_factory):
    """Surrogates stolen from `victim` over 1,000 MNIST images: with marks, without, and the key file."""
    root = tmp_path_factory.mktemp("theft")
    key = root / "watermark.key"
    # a fixed key, so the marks (and every share the tests read from them) are the same on every run; how a missing
    # key is created is tested on its own below
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, bytes(range(7, 39)))
    os.close(fd)
    common = ["steal", "--victim", victim, "--pool", mnist_small, "--budget", 800, "--epochs", 60, "--device", "cpu"]
    marked = root / "marked.h5"
    r = invoke(*common, "--defense", "watermark", "--watermark-key", key, *STRONG, "--out", marked)
    assert r.exit_code == 0, r.stderr
    clean = root / "clean.h5"
    r = invoke(*common, "--seed", 1, "--out", clean)
    assert r.exit_code == 0, r.stderr
    return dict(root=root, key=key, marked=marked, clean=clean)


def test_the_key_is_a_private_file_and_never_reaches_the_artifact(theft, tmp_path):
    key = theft["key"].read_bytes()
    assert len(key) == 32 and (os.stat(theft["key"]).st_mode & 0o777) == 0o600
    fresh = tmp_path / "new" / "watermark.key"  # a missing key is written: random, private, and kept
    made = watermark_key.load_or_create(fresh)
    assert len(made) == 32 and made != key and (os.stat(fresh).st_mode & 0o777) == 0o600
    assert watermark_key.load_or_create(fresh) == made == fresh.read_bytes()
    blob = theft["marked"].read_bytes()
    assert key not in blob and key.hex().encode() not in blob
    with h5py.File(theft["marked"]) as f:
        group = f["transfer/watermark"]
        assert group.attrs["key_fingerprint"] == key_fingerprint(key)
        assert "watermark_key" not in f.attrs["params"] and str(theft["key"]) not in f.attrs["params"]
        marked = group["marked"][()]
        answers, keyed = f["transfer/answers"][()], group["keyed_class"][()]
        assert len(marked) == 800 and 0.2 < marked.mean() < 0.4
        assert (answers[marked].argmax(1) == keyed[marked]).all()  # the recorded marks are what the thief got
        assert (answers[~marked].argmax(1) != keyed[~marked]).all()


def test_a_surrogate_of_the_watermarked_victim_is_named_and_an_unmarked_one_is_not(theft):
    out = theft["root"] / "verification.h5"
    r = invoke(
        "verify", "--suspect", theft["marked"], "--evidence", theft["marked"], "--key", theft["key"], "--out", out
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(out)
    with h5py.File(out) as f:
        assert f.attrs["schema"] == "verification/1" and f.attrs["verdict"] == "stolen"
        assert f.attrs["p_value"] < 1e-6 and f.attrs["marked"] == f.attrs["controls"] > 150
        assert f.attrs["marked_agree"] > 3 * f.attrs["control_agree"]
        assert f.attrs["key_fingerprint"] == key_fingerprint(theft["key"].read_bytes())
    clean = theft["root"] / "clean-verification.h5"
    r = invoke("verify", "--suspect", theft["clean"], "--evidence", theft["marked"], "--out", clean)
    assert r.exit_code == 0, r.stderr
    with h5py.File(clean) as f:
        assert f.attrs["verdict"] == "not shown" and f.attrs["p_value"] > 1e-3


def test_controls_match_the_marked_queries_in_confidence(theft):
    with h5py.File(theft["marked"]) as f:
        group = f["transfer/watermark"]
        confidence, marked = group["confidence"][()], group["marked"][()]
    pick_marked, pick_control = _evidence._controls(marked, confidence)
    assert np.array_equal(pick_marked, np.flatnonzero(marked))
    assert not marked[pick_control].any() and len(set(pick_control)) == len(pick_control)
    gap = np.abs(confidence[pick_marked] - confidence[pick_control])
    shuffled = np.abs(confidence[pick_marked] - np.random.default_rng(0).permutation(confidence[~marked])[: len(gap)])
    assert gap.mean() < shuffled.mean() / 5
    ev = _evidence.load(theft["marked"])
    with h5py.File(theft["marked"]) as f:
        first = _evidence.distinct(f["transfer/images"][()], 255.0, ev.cell, ev.levels)
    assert len(ev.marked_images) == len(ev.control_images) == (marked & first).sum()  # one per hashed image
    assert ev.source["marked_queries"] == marked.sum()


def test_bad_input_fails_in_one_line_and_writes_nothing(theft, tiny, tmp_path):
    out = tmp_path / "v.h5"
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_bytes(b"x" * 32)
    three = write_dataset(tmp_path / "rgb.h5", shape=(3, 16, 16), sizes={"train": 60, "val": 20, "test": 20})
    rgb = tmp_path / "rgb-victim.h5"
    assert invoke("train", "--dataset", three, "--epochs", 1, "--device", "cpu", "--out", rgb).exit_code == 0
    cases = {
        "holds no marks": ["--suspect", theft["marked"], "--evidence", theft["clean"]],
        "wrong key file": ["--suspect", theft["marked"], "--evidence", theft["marked"], "--key", wrong_key],
        "takes [3, 16, 16]": ["--suspect", rgb, "--evidence", theft["marked"]],
        "cannot connect": ["--suspect", "http://127.0.0.1:9", "--api-key", "k", "--evidence", theft["marked"]],
        "no such file": ["--suspect", tmp_path / "none.h5", "--evidence", theft["marked"]],
        "not a surrogate or victim": ["--suspect", tiny, "--evidence", theft["marked"]],
    }
    for expected, args in cases.items():
        line = assert_one_line_error(invoke("verify", *args, "--out", out))
        assert expected in line, line
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_export_refuses_the_watermark_and_serve_and_steal_take_its_key_only_with_it(victim, tiny, tmp_path):
    line = assert_one_line_error(
        invoke("export", "--victim", victim, "--defense", "watermark", "--out", tmp_path / "v.pt")
    )
    assert "secret key" in line and not (tmp_path / "v.pt").exists()
    line = assert_one_line_error(invoke("serve", "--model", victim, "--defense", "watermark", "--keys", tmp_path / "k"))
    assert "--watermark-key" in line
    out = tmp_path / "s.h5"
    args = ["steal", "--victim", victim, "--pool", tiny, "--budget", 10, "--device", "cpu", "--out", out]
    line = assert_one_line_error(invoke(*args, "--watermark-key", tmp_path / "key"))
    assert "--defense watermark" in line and not out.exists() and not (tmp_path / "key").exists()


def test_the_ledger_keeps_marks_and_controls_and_verify_reads_them(theft, victim, tmp_path, ledger_at):
    """serve's marking path (stages/serving/watermark.py) into a ledger, without HTTP: the batches a client sends,
    recorded with their evidence in one transaction; `verify --evidence` reads it from either backend alike."""
    from stages.serving.backends import open_ledger
    from stages.serving.ledger import Answered
    from stages.serving.watermark import Marker
    from stages.training import victim as _victim

    with h5py.File(theft["marked"]) as f:
        images = f["transfer/images"][()].astype(np.float32) / 255.0
    net, _ = _victim.load(victim)
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(images)), 1).numpy()
    book = open_ledger(ledger_at)
    book.enrol(["alice", "bob"])
    marker = Marker(theft["key"], ood_threshold=1.0)
    marker.defense.ood_rate = 0.3
    served = []
    for start in range(0, len(images), 100):
        batch = slice(start, start + 100)
        answers, marks = marker.mark(images[batch], probs[batch], [("alice", 60), ("bob", 40)])
        rows = [Answered(name, 0.0, "0" * 64, None, part, 0) for name, part in (("alice", answers[:60]),
                ("bob", answers[60:]))]  # fmt: skip
        assert [d.refused for d in book.record(rows, marks)] == [None, None]
        served.append(answers)
    counts = dict(Counter(m[0] for m in book.marks("alice")))
    book.close()
    served = np.concatenate(served)
    with h5py.File(theft["marked"]) as f:  # the same key, images and victim: the same answers as the offline theft
        np.testing.assert_allclose(served, f["transfer/answers"][()], atol=1e-6)
    assert counts[1] > 100 and counts[0] >= counts[1]  # two controls owed per mark, paid from later answers
    out = tmp_path / "v.h5"
    args = ["verify", "--suspect", theft["marked"], "--evidence", ledger_at, "--principal", "alice"]
    r = invoke(*args, "--key", theft["key"], "--out", out)
    assert r.exit_code == 0, r.stderr
    with h5py.File(out) as f:
        assert f.attrs["verdict"] == "stolen" and json.loads(f.attrs["evidence"])["marked_queries"] == counts[1]
        assert 0.9 * counts[1] < f.attrs["marked"] <= counts[1]  # one per hashed image
        assert "password" not in f.attrs["params"] and json.loads(f.attrs["evidence"])["kind"] == "ledger"
    line = assert_one_line_error(invoke(*args[:-1], "carol", "--out", out))
    assert "no marked answers for principal 'carol'" in line


def test_a_request_refused_at_its_debit_leaves_no_evidence(theft, ledger_at):
    """Marks and controls are written in the debit's transaction: those of a request over its budget, or (on
    PostgreSQL) of an Idempotency-Key another replica answered meanwhile, are dropped; the others are stored."""
    from stages.serving.backends import open_ledger
    from stages.serving.ledger import Answered
    from stages.serving.watermark import Marker

    with h5py.File(theft["marked"]) as f:
        images = f["transfer/images"][:300].astype(np.float32) / 255.0
    probs = np.full((300, 10), 0.1, np.float32)  # below the threshold: every answer looks OOD, 30 % are marked
    marker = Marker(theft["key"], ood_threshold=1.0)
    marker.defense.ood_rate = 0.3
    book = open_ledger(ledger_at)
    book.enrol(["alice", "bob", "carol"])
    answers, marks = marker.mark(images, probs, [("alice", 100), ("bob", 100), ("carol", 100)])
    batch = [
        Answered("alice", 1.0, "0" * 64, None, answers[:100], 0, budget=1000),
        Answered("bob", 1.0, "0" * 64, None, answers[100:200], 0, budget=50),  # over its budget
    ]
    if ledger_at.startswith("postgresql://"):  # SQLite: one server per file replays a key before it reaches a debit
        assert book.record([Answered("carol", 0.0, "0" * 64, "k", answers[200:], 0)])[0].refused is None
        batch.append(Answered("carol", 1.0, "0" * 64, "k", answers[200:], 0))  # answered meanwhile elsewhere
    else:
        marks = [m for m in marks if m.request < 2]
    debits = book.record(batch, marks)
    marker.settle(marks, {i for i, d in enumerate(debits) if d.refused is not None})
    stored = {name: Counter(m[0] for m in book.marks(name)) for name in ("alice", "bob", "carol")}
    book.close()
    assert [d.refused for d in debits] == [None, "budget", "duplicate"][: len(batch)]
    ours = {name: Counter(int(m.marked) for m in marks if m.request == i) for i, name in enumerate(stored)}
    assert ours["bob"][1] > 10 and ours["alice"][1] > 10  # there were marks to drop and to keep
    assert stored == {"alice": ours["alice"], "bob": Counter(), "carol": Counter()}
    refused = ["bob", "carol"] if len(batch) == 3 else ["bob"]  # SQLite: carol's request never reached a debit
    assert all(marker._owed.get((name, True), 0) == 0 for name in refused)  # refused requests owe no controls


def test_a_resumed_theft_records_the_same_marks(tmp_path):
    """steal --resume replays the transfer set: the owner's record is recomputed from the images, identically."""
    from models.defenses import Deployed
    from stages.attacks.blackbox import BlackBox
    from stages.deploy import defense as _defense

    net = _defense.random_proxy("lenet5", 10, (1, 28, 28), [0.5], [0.25], 0)
    graph = Deployed(net, watermark(rate=0.0, ood_rate=0.3, threshold=1.0)).eval()
    images = torch.randint(0, 256, (300, 1, 28, 28)).float() / 255.0
    with h5py.File(tmp_path / "a.h5", "w") as fa, h5py.File(tmp_path / "b.h5", "w") as fb:
        first = BlackBox(graph, 300, "soft", (1, 28, 28), 10, "cpu", fa.create_group("transfer"), True)
        first(images[:200])
        first(images[200:])
        first.close()
        resumed = BlackBox(graph, 300, "soft", (1, 28, 28), 10, "cpu", fb.create_group("transfer"), True)
        resumed.replay(*first.recorded())
        resumed.close()
        for name in ("marked", "keyed_class", "confidence"):
            np.testing.assert_array_equal(fa[f"transfer/watermark/{name}"][()], fb[f"transfer/watermark/{name}"][()])
        assert 60 < fa["transfer/watermark"].attrs["marked_count"] < 120


def test_deployed_files_are_suspects_too(theft, victim, tmp_path):
    """The victim itself, as victim.h5, TorchScript and ONNX: it never learnt its own marks, and all three files
    give the same verification (the same answers within float tolerance)."""
    outcomes = {}
    for fmt in ("h5", "torchscript", "onnx"):
        suspect = victim
        if fmt != "h5":
            suspect = tmp_path / f"victim.{'pt' if fmt == 'torchscript' else 'onnx'}"
            r = invoke("export", "--victim", victim, "--format", fmt, "--out", suspect)
            assert r.exit_code == 0, r.stderr
        out = tmp_path / f"v-{fmt}.h5"
        r = invoke("verify", "--suspect", suspect, "--evidence", theft["marked"], "--out", out)
        assert r.exit_code == 0, r.stderr
        with h5py.File(out) as f:
            assert f.attrs["suspect_kind"] == {"h5": "victim", "torchscript": "torchscript", "onnx": "onnx"}[fmt]
            outcomes[fmt] = (int(f.attrs["marked_agree"]), int(f.attrs["control_agree"]), f.attrs["verdict"])
    assert len(set(outcomes.values())) == 1 and outcomes["h5"][2] == "not shown", outcomes
    assert outcomes["h5"][0] == 0  # the victim's own top-1 is never the class its mark points to


def test_a_stolen_copy_deployed_and_distilled_once_more_is_still_named(theft, mnist_small, tmp_path):
    """A thief exports its surrogate (export takes a surrogate.h5 too) and a second thief distils that file on the
    same pool: the marks the first copy learnt reach the second, so the copy of the copy is named; the first copy's
    deployed file gives the same verification as its weights."""
    copy = tmp_path / "copy.pt"
    r = invoke("export", "--victim", theft["marked"], "--out", copy)
    assert r.exit_code == 0, r.stderr
    second = tmp_path / "second.h5"
    r = invoke(
        "steal", "--victim", copy, "--pool", mnist_small, "--budget", 800, "--epochs", 60, "--device", "cpu",
        "--seed", 2, "--out", second,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    verdicts = {}
    for suspect in (theft["marked"], copy, second):
        out = tmp_path / f"v-{suspect.stem}-{suspect.suffix[1:]}.h5"
        r = invoke("verify", "--suspect", suspect, "--evidence", theft["marked"], "--key", theft["key"], "--out", out)
        assert r.exit_code == 0, r.stderr
        with h5py.File(out) as f:
            verdicts[suspect.name] = (int(f.attrs["marked_agree"]), float(f.attrs["p_value"]))
    assert verdicts["copy.pt"][0] == verdicts[theft["marked"].name][0]
    assert verdicts["second.h5"][1] < 1e-6, verdicts


def test_evaluate_rebuilds_the_watermark_with_the_key_that_marked_the_answers(theft, victim, tmp_path):
    """Benign accuracy as deployed needs the same key: without it, or with another, evaluate refuses in one line.
    With it, the deployed accuracy is the victim's test accuracy behind the watermark rebuilt with that key."""
    out = tmp_path / "metrics.h5"
    common = ("evaluate", theft["marked"], victim, "--out", out, "--benign-budget", "none", "--device", "cpu")
    assert "--watermark-key" in assert_one_line_error(invoke(*common))
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"y" * 32)
    assert "another key" in assert_one_line_error(invoke(*common, "--watermark-key", wrong))
    assert not out.exists()
    r = invoke(*common, "--watermark-key", theft["key"])
    assert r.exit_code == 0, r.stderr
    rows = {Path(row["file"]).name: row["benign_accuracy"] for row in metrics.ROWS.read(out)}
    with h5py.File(out) as f:
        assert str(theft["key"]) not in f.attrs["params"]
    graph, info = _blackbox.open_victim(Path(victim), "cpu")
    with h5py.File(theft["marked"]) as f:
        params = json.loads(f.attrs["defense_params"])
    deployed = _blackbox.defend(graph, info, "watermark", params, "cpu", theft["key"])
    images, labels = _data.load(info.dataset_path, splits=("test",)).splits["test"]
    x = _data.to_float(images)
    with torch.no_grad():
        moved = (deployed(x).argmax(1) != graph(x).argmax(1)).float().mean()
        expected = (deployed(x).argmax(1) == labels).float().mean()
    assert moved > 0.1  # the strong setting marks a large share of the test answers
    assert rows[theft["marked"].name] == pytest.approx(float(expected), abs=1e-6)


def test_jbda_queries_off_the_8_bit_grid_verify_under_their_key(victim, tiny, tmp_path):
    """JBDA's sign steps of 0.1 put pixels at half a grey level (25.5 / 255); the key check reads them on the same
    grid the defense marked them on, so every marked image draws under its rate with the key."""
    key, out = tmp_path / "watermark.key", tmp_path / "jbda.h5"
    fine = ["--defense-param", "cell=1", "--defense-param", "levels=256"]  # the tiny images coarsen alike
    r = invoke(
        "steal", "--victim", victim, "--attack", "jbda", "--pool", tiny, "--budget", 600, "--epochs", 1,
        "--device", "cpu", "--defense", "watermark", "--watermark-key", key, *STRONG, *fine, "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    with h5py.File(out) as f:
        images, marked = f["transfer/images"][()], f["transfer/watermark/marked"][()]
    off_grid = np.abs(images[marked] * 255.0 - np.rint(images[marked] * 255.0)) > 1e-3
    assert marked.sum() > 20 and off_grid.any()
    r = invoke("verify", "--suspect", out, "--evidence", out, "--key", key, "--out", tmp_path / "v.h5")
    assert r.exit_code == 0, r.stderr


def _asked_again(src: Path, dst: Path, index: int, times: int) -> None:
    """A copy of a transfer set in which query `index` was asked `times` more times (the same image, the same
    answer and the same record)."""
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for name in ("transfer/images", "transfer/answers", *(f"transfer/watermark/{k}" for k in WATERMARK_RECORD)):
            values, attrs = f[name][()], dict(f[name].attrs)
            del f[name]
            f.create_dataset(name, data=np.concatenate([values, np.repeat(values[index : index + 1], times, 0)]))
            f[name].attrs.update(attrs)


WATERMARK_RECORD = ("marked", "keyed_class", "confidence")


def test_a_marked_image_asked_many_times_is_one_mark(theft, tmp_path):
    """Queries of one hashed image share one keyed draw, so they are one observation: a model that never saw a mark
    but happens to favour one marked image's keyed class is not named however often the thief asked that image
    (counted per query, 200 repeats of one image named a clean model stolen at p 1.3e-66)."""
    from stages.provenance import suspect as _suspect

    ev = _evidence.load(theft["marked"])
    clean = _suspect.open_suspect(str(theft["clean"]), None)
    favoured = significance.score(_suspect.query(clean, ev.marked_images), ev.marked_class)
    with h5py.File(theft["marked"]) as f:
        marked = np.flatnonzero(f["transfer/watermark/marked"][()])
        images = f["transfer/images"][()][marked]
    index = int(marked[np.flatnonzero((images == ev.marked_images[np.argmax(favoured)] * 255).all((1, 2, 3)))[0]])
    repeated = tmp_path / "asked-again.h5"
    _asked_again(theft["marked"], repeated, index, 200)
    again = _evidence.load(repeated)
    assert len(again.marked_images) == len(ev.marked_images) and again.source["marked_queries"] == len(marked) + 200
    out = tmp_path / "v.h5"
    r = invoke("verify", "--suspect", theft["clean"], "--evidence", repeated, "--out", out)
    assert r.exit_code == 0, r.stderr
    with h5py.File(out) as f:
        assert f.attrs["verdict"] == "not shown" and f.attrs["p_value"] > 1e-3, f.attrs["p_value"]


def test_fake_keys_find_the_copy_beyond_every_one_and_the_clean_model_among_them(theft, tmp_path):
    """--null-keys: the marked copy's p is below every fake key's; the clean model's fake-key p-values show no
    excess below 0.05. Recorded in verification.h5."""
    shares = {}
    for name in ("marked", "clean"):
        out = tmp_path / f"{name}.h5"
        args = ["--evidence", theft["marked"], "--key", theft["key"], "--null-keys", 60, "--out", out]
        r = invoke("verify", "--suspect", theft[name], *args)
        assert r.exit_code == 0, r.stderr
        assert "fake keys" in r.stderr and r.stdout.strip() == str(out)
        with h5py.File(out) as f:
            null_p = f["null_p"][()]
            assert len(null_p) == 60 and f.attrs["null_keys"] == np.isfinite(null_p).sum() >= 50
            assert json.loads(f.attrs["params"])["null_keys"] == 60
            shares[name] = (f.attrs["null_share_at_or_below"], f.attrs["null_below_005"], f.attrs["null_ks_p"])
            if name == "marked":
                assert f.attrs["p_value"] < np.nanmin(null_p)
    assert shares["marked"][0] == 0.0
    assert shares["clean"][1] < 0.2 and shares["clean"][2] > 0.01  # no excess of small fake-key p-values


def test_null_keys_refuse_what_they_cannot_calibrate(theft, tmp_path):
    out = tmp_path / "v.h5"
    cases = {
        "needs --key": ["--null-keys", 10],
        "greater than or equal to 0": ["--key", theft["key"], "--null-keys", -1],
    }
    for expected, args in cases.items():
        line = assert_one_line_error(
            invoke("verify", "--suspect", theft["clean"], "--evidence", theft["marked"], *args, "--out", out)
        )
        assert expected in line, line
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()

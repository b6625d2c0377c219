"""evaluate: metrics recomputed from weights on hand-built victims and surrogates, seed aggregation, the report."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke
from tiny_data import write_dataset

from stages import _victim, evaluate, train
from stages._artifacts import save_history, save_state, sha256, write_artifact


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset and a victim trained on it for one epoch."""
    root = tmp_path_factory.mktemp("eval")
    data = write_dataset(root / "synth.h5")
    victim = train.run(dataset=str(data), epochs=2, batch_size=16, out=root / "victim.h5", device="cpu")
    return root, data, victim


def write_surrogate(path, victim, state, seed=0, defense="none", defense_params=None, curve=(0.1, 0.2)):
    """A surrogate.h5 as steal writes it, with weights chosen by the test."""
    _, info = _victim.load(victim)
    params = dict(victim=str(victim), pool=str(path.parent / "pool.h5"), seed=seed)
    with write_artifact(path, "surrogate", "steal", params, [victim], seed) as f:
        f.attrs.update(attack="knockoff", label="soft", defense=defense, arch=info.arch, dataset=info.dataset,
                       victim_sha256=sha256(victim), queries=123, defense_params=json.dumps(defense_params or {}),
                       classes=json.dumps(info.classes), input_shape=list(info.input_shape), mean=info.mean,
                       std=info.std)
        save_state(f.create_group("weights"), state)
        save_history(f.create_group("history"), {"stealing_accuracy": list(curve)})
    return path


def test_identical_surrogate_has_full_fidelity(world):
    root, data, victim = world
    model, info = _victim.load(victim)
    copy = write_surrogate(root / "copy.h5", victim, model.state_dict(), curve=(0.3, 0.9, 0.5))
    row = evaluate._evaluate(copy, None, "cpu", {})
    assert row["fidelity"] == 1.0
    assert row["stealing_accuracy"] == row["benign_accuracy"] == pytest.approx(info.test_accuracy)
    assert row["relative_accuracy"] == 1.0 and row["max_stealing_accuracy"] == 0.9 and row["queries"] == 123


def test_other_surrogate_metrics_match_a_direct_computation(world):
    root, data, victim = world
    model, info = _victim.load(victim)
    torch.manual_seed(7)
    other = info.build().eval()
    path = write_surrogate(root / "other.h5", victim, other.state_dict())
    row = evaluate._evaluate(path, None, "cpu", {})
    with h5py.File(data, "r") as f:
        x = torch.from_numpy(f["test/images"][()]).float() / 255
        y = torch.from_numpy(f["test/labels"][()])
    with torch.no_grad():
        stolen, truth = other(x).argmax(1), model(x).argmax(1)
    assert row["stealing_accuracy"] == pytest.approx(float((stolen == y).float().mean()))
    assert row["fidelity"] == pytest.approx(float((stolen == truth).float().mean()))
    assert row["fidelity"] < 1.0


def test_top1_defense_keeps_benign_accuracy_and_rounding_is_recorded(world):
    root, data, victim = world
    model, _ = _victim.load(victim)
    row = evaluate._evaluate(write_surrogate(root / "top1.h5", victim, model.state_dict(), defense="top1"), None,
                             "cpu", {})
    assert row["defense"] == "top1" and row["fidelity"] == 1.0
    assert row["benign_accuracy"] == row["stealing_accuracy"]


def test_aggregate_mean_std_n():
    rows = [dict(dataset="d", victim="v", defense="none", attack="a", label="soft", pool="p", seed=s,
                 benign_accuracy=b, stealing_accuracy=st, max_stealing_accuracy=st, relative_accuracy=st / b,
                 fidelity=st, queries=10, victim_seconds=1.0, steal_seconds=np.nan, queries_to_50=q, queries_to_80=np.nan,
                 queries_to_95=np.nan)
            for s, b, st, q in ((0, 0.9, 0.2, 100.0), (1, 0.8, 0.4, 300.0), (2, 1.0, 0.6, np.nan))]
    rows.append(dict(rows[0], defense="mad", seed=0))
    groups = evaluate.aggregate(rows)
    assert [g["n"] for g in groups] == [1, 3]  # sorted: "mad" before "none"
    g = groups[1]
    assert g["benign_accuracy_mean"] == pytest.approx(0.9) and g["benign_accuracy_std"] == pytest.approx(0.1)
    assert g["stealing_accuracy_mean"] == pytest.approx(0.4) and g["stealing_accuracy_std"] == pytest.approx(0.2)
    assert np.isnan(g["steal_seconds_mean"]) and groups[0]["benign_accuracy_std"] == 0.0
    assert g["queries_to_50_mean"] == 200.0 and np.isnan(g["queries_to_80_mean"])  # over the seeds that reached it


def test_queries_to_reach_a_share_of_benign_accuracy_reads_the_first_point_that_does():
    queries, accuracy = np.array([400.0, 100.0, 200.0, 800.0]), np.array([0.9, 0.3, 0.6, 0.85])
    reached = evaluate.queries_to(queries, accuracy, benign=0.95)
    assert reached["queries_to_50"] == 200.0  # 0.475: the 100-query surrogate falls short
    assert reached["queries_to_80"] == 400.0  # 0.76, and the later dip to 0.85 does not move it
    assert np.isnan(reached["queries_to_95"])  # 0.9025 was never reached


def test_cli_writes_metrics_and_report_with_latency(world):
    root, data, victim = world
    model, _ = _victim.load(victim)
    surrogates = [write_surrogate(root / f"s{seed}.h5", victim, model.state_dict(), seed=seed) for seed in (0, 1)]
    bench = root / "bench.json"
    bench.write_text(json.dumps({"benchmarks": [
        {"name": f"test_latency[{d}-{b}]", "params": {"defense": d, "batch": b, "device": "cpu"},
         "stats": {"median": m}} for d, b, m in (("none", 1, 1e-4), ("mad", 1, 2e-3), ("none", 256, 1e-3),
                                                  ("mad", 256, 3e-2))]}))
    out = root / "metrics.h5"
    result = invoke("evaluate", *surrogates, victim, "--out", out, "--benchmark", bench, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    with h5py.File(out, "r") as f:
        assert f.attrs["schema"] == "metrics/1"
        assert len(f["rows/file"]) == 3 and list(f["groups/n"].asstr()[()]) == ["1", "2"]
        assert np.allclose(f["groups/fidelity_mean"][()][1], 1.0)
    report = root / "report"
    for name in ("report.md", "tradeoff-knockoff.png", "latency.png"):
        assert (report / name).stat().st_size > 1000 or name == "report.md"
    text = (report / "report.md").read_text()
    assert "| cpu | 256 | mad | 30.000 | 30.00 |" in text and "knockoff" in text


def test_mismatched_dataset_is_one_line(world, tmp_path):
    root, data, victim = world
    model, _ = _victim.load(victim)
    surrogate = write_surrogate(tmp_path / "s.h5", victim, model.state_dict())
    other = write_dataset(tmp_path / "cifar.h5", name="cifar10", shape=(3, 32, 32))
    out = tmp_path / "metrics.h5"
    line = assert_one_line_error(invoke("evaluate", surrogate, "--data", other, "--out", out))
    assert "cifar10" in line and not out.exists()


def test_changed_victim_and_wrong_kind_are_refused(world, tmp_path):
    root, data, victim = world
    model, _ = _victim.load(victim)
    surrogate = write_surrogate(tmp_path / "s.h5", victim, model.state_dict())
    with h5py.File(surrogate, "r+") as f:
        f.attrs["victim_sha256"] = "0" * 64
    assert "changed" in assert_one_line_error(invoke("evaluate", surrogate, "--out", tmp_path / "m.h5"))
    assert "evaluate takes" in assert_one_line_error(invoke("evaluate", data, "--out", tmp_path / "m.h5"))
    assert not (tmp_path / "m.h5").exists()


def test_victims_record_their_recipe_and_older_victims_get_the_same_by_derivation(world, tmp_path):
    root, data, victim = world
    _, info = _victim.load(victim)
    assert info.recipe["objective"] == "ce" and info.recipe["epochs"] == 2 and "seed" not in info.recipe
    assert info.recipe_changes == {"batch_size": 16, "epochs": 2}  # what the world's victim was trained with
    legacy = tmp_path / "legacy.h5"  # as code from before victims recorded their recipe wrote it
    legacy.write_bytes(victim.read_bytes())
    with h5py.File(legacy, "r+") as f:
        del f.attrs["recipe"], f.attrs["recipe_changes"]
    old, new = (evaluate._evaluate(path, None, "cpu", {}) for path in (legacy, victim))
    assert old["victim"] == new["victim"] == f"lenet5/ce#{info.recipe_id}"
    assert json.loads(old["victim_recipe"]) == info.recipe and json.loads(old["victim_changes"]) == info.recipe_changes


def test_seeds_group_across_code_versions_and_folders():
    """A train-ini flag added after a victim was trained reads as its default; where files lay, how the maths ran
    and search settings of a search that is off do not split a recipe; a real change does."""
    from stages import train_ini

    old = {"arch": "lenet5", "gamma": 0.3, "ood": "artifacts/grid/data/fashionmnist.h5", "seed": 0, "epochs": 5,
           "surrogates": 1, "surrogate_archs": ["lenet5"]}
    new = {**old, "ood": "/elsewhere/fashionmnist.h5", "seed": 1, "preset": "faithful", "clip": "official",
           "compile_mode": "on", "ood_synthetic": 0.0, "ood_synthetic_steps": 3, "ood_synthetic_eps": 0.25,
           "pcgrad_reduction": "mean", "augment": False}
    recipe, changes = train_ini.recipe_identity(old, 1)
    assert (recipe, changes) == train_ini.recipe_identity(new, 1)
    assert changes == {"epochs": 5, "ood": "fashionmnist"}
    assert recipe == train_ini.recipe_identity({**new, "ood_synthetic_steps": 9}, 1)[0]
    assert recipe != train_ini.recipe_identity({**new, "ood_synthetic": 0.25}, 1)[0]
    assert recipe != train_ini.recipe_identity({**new, "epochs": 50}, 1)[0]


def test_victim_answers_are_computed_once_per_defense_and_not_mixed_up(world, monkeypatch):
    root, data, victim = world
    model, info = _victim.load(victim)
    cells = [("none", {})] * 2 + [("mad", {"eps": 1.1, "seed": 0})] * 2
    paths = [write_surrogate(root / f"shared{i}.h5", victim, model.state_dict(), defense=d, defense_params=p)
             for i, (d, p) in enumerate(cells)]
    alone = [evaluate._evaluate(path, None, "cpu", {})["benign_accuracy"] for path in paths]
    passes, predict = [], evaluate._blackbox.predict
    monkeypatch.setattr(evaluate._blackbox, "predict", lambda *a: passes.append(1) or predict(*a))
    cache = {}
    rows = [evaluate._evaluate(path, None, "cpu", cache) for path in paths]
    assert len(passes) == 4 + 2  # each surrogate's own pass; the victim's once, the MAD-defended victim's once
    assert [r["benign_accuracy"] for r in rows] == alone
    assert alone[0] == pytest.approx(info.test_accuracy) and alone[2] != alone[0]  # MAD's answers differ


def test_plot_legend_drops_the_recipe_hash_only_where_names_stay_apart():
    from stages import _evaluate_report
    settings = (("mnist", "lenet5/ce#aaaaaa"), ("mnist", "lenet5/faithful#bbbbbb"), ("mnist", "lenet5/faithful#cccccc"),
                ("fashionmnist", "lenet5/ini#dddddd"), ("mnist", "lenet5/ini#eeeeee"))
    groups = [dict(dataset=d, victim=v, victim_arch=v.split("/")[0], victim_kind=v.split("/")[1].split("#")[0])
              for d, v in settings]
    names = _evaluate_report._short_names(groups)
    assert names == {"lenet5/ce#aaaaaa": "lenet5/ce", "lenet5/faithful#bbbbbb": "lenet5/faithful#bbbbbb",
                     "lenet5/faithful#cccccc": "lenet5/faithful#cccccc", "lenet5/ini#dddddd": "lenet5/ini",
                     "lenet5/ini#eeeeee": "lenet5/ini"}  # one name per victim dataset's panel is enough

"""`steal`: the budget is exact for every attack, attacks only ever hold the query callable, the whole chain runs
through the CLI and writes an auditable surrogate.h5, and bad input fails in one line without an output file."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
import models
from stages import prepare, steal, train
from stages.attacks import ATTACKS, Thief
from stages.attacks import blackbox as _blackbox
from stages.attacks._thief import SurrogateRecipe
from stages.attacks.jbda import JBDA
from stages.core.artifacts import load_state, open_artifact
from stages.data import prepared as _data
from stages.serving import detectors

# Small enough for seconds per attack on one core; budgets chosen so every last query batch is partial.
FAST = {"epochs": 1, "batch_size": 32, "query_batch": 40, "device": "cpu"}
ATTACK_PARAMS = {"dfme": ["width=8", "noise_dim=16"], "jbda": ["seeds=40"], "jbda-tr": ["seeds=40"]}
BATCH = {"dfme": 16}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny victim on sklearn digits (28x28) and a 16x16 pool of digits the thief must resize."""
    root = tmp_path_factory.mktemp("steal")
    data = prepare.run(dataset="sklearn-digits", out=root / "digits.h5", limit=500)
    pool = prepare.run(dataset="sklearn-digits", out=root / "pool16.h5", size=16, seed=1)
    victim = train.run(dataset=str(data), out=root / "victim.h5", epochs=2, device="cpu")
    return {"root": root, "data": data, "pool": pool, "victim": victim}


def _steal(world, out: Path, attack: str, budget: int, **kwargs) -> Path:
    options = dict(FAST, batch_size=BATCH.get(attack, 32), attack_param=ATTACK_PARAMS.get(attack))
    options.update(kwargs)
    pool = None if ATTACKS[attack].POOL == "none" else str(world["pool"])
    return steal.run(victim=world["victim"], attack=attack, budget=budget, pool=pool, out=out, **options)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_attack_spends_exactly_its_budget(world, tmp_path, attack):
    budget = 237  # 5 query batches of 40 + 37; jbda: 40 + 80 + 117 of 160; adaptive: 59 images x 4 + 1
    out = _steal(world, tmp_path / "s.h5", attack, budget)
    with open_artifact(out, "surrogate") as f:
        assert int(f.attrs["queries"]) == budget == int(f["transfer"].attrs["count"])
        assert f["transfer/images"].shape[0] == f["transfer/answers"].shape[0] == budget
        assert len(f["history/stealing_accuracy"]) >= 1
        assert f["history/queries"][-1] == budget


def test_jbda_stops_at_its_schedule_under_a_larger_budget(world, tmp_path):
    out = _steal(world, tmp_path / "s.h5", "jbda", 10_000, attack_param=["seeds=20", "rounds=3"])
    with open_artifact(out, "surrogate") as f:
        assert int(f.attrs["queries"]) == 20 + 40 + 80  # the whole set re-labelled every round
        assert len(f["history/stealing_accuracy"]) == 3  # one epoch per round


def test_the_black_box_never_answers_past_the_budget(tmp_path):
    seen = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            seen.append(len(x))
            return torch.softmax(x.flatten(1)[:, :3], 1)

    with h5py.File(tmp_path / "t.h5", "w") as f:
        box = _blackbox.BlackBox(
            Counting(), 10, "soft", (1, 2, 2), 3, "cpu", f.create_group("transfer"), exact_uint8=True
        )
        images = torch.randint(0, 256, (7, 1, 2, 2), dtype=torch.uint8)
        assert len(box(_data.to_float(images))) == 7
        assert len(box(_data.to_float(images))) == 3  # what is left, no more
        with pytest.raises(_blackbox.BudgetExhausted):
            box(_data.to_float(images))
        box.close()
        assert sum(seen) == 10
        assert f["transfer/images"].shape == (10, 1, 2, 2)
        np.testing.assert_array_equal(f["transfer/images"][:7], images.numpy())
        np.testing.assert_array_equal(f["transfer/images"][7:], images[:3].numpy())


class _FakeQuery:
    """A black box with no network behind it: a fixed random linear map. All an attack may rely on."""

    def __init__(self, budget, label, shape, k):
        self.budget, self.label, self.used = budget, label, 0
        self._w = torch.randn(int(np.prod(shape)), k, generator=torch.Generator().manual_seed(0))

    @property
    def remaining(self):
        return self.budget - self.used

    def __call__(self, images):
        images = images[: self.remaining]
        self.used += len(images)
        probs = torch.softmax(images.flatten(1) @ self._w, 1)
        return probs if self.label == "soft" else probs.argmax(1)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_hold_only_the_query_callable(attack):
    shape, k = (1, 28, 28), 10
    cls = ATTACKS[attack]
    surrogate = models.build_model("lenet5", k, 1, 28, [0.5], [0.25])
    before = [p.detach().clone() for p in surrogate.parameters()]
    pool = torch.randint(0, 256, (300, *shape), dtype=torch.uint8) if cls.POOL != "none" else None
    labelled = (torch.randint(0, 256, (50, *shape), dtype=torch.uint8), torch.arange(50) % k)
    recipe = SurrogateRecipe(
        epochs=1, batch_size=16, lr=0.03, momentum=0.9, weight_decay=5e-4, optimizer="sgd", schedule="cosine"
    )
    thief = Thief(
        surrogate,
        recipe,
        k,
        shape,
        torch.Generator().manual_seed(0),
        "cpu",
        40,
        pool,
        labelled=labelled if cls.LABELLED else None,
    )
    query = _FakeQuery(150, cls.LABELS[0], shape, k)
    params = {"dfme": {"width": 8, "noise_dim": 16}, "jbda": {"seeds": 30}, "jbda-tr": {"seeds": 30}}.get(attack, {})
    cls(**params).run(query, thief)
    assert 0 < query.used <= 150
    assert any(not torch.equal(a, b) for a, b in zip(before, surrogate.parameters(), strict=True))


def test_attack_code_cannot_reach_the_victim():
    """No attack module imports what loads or wraps a victim. The black box beside them is the one door (it holds
    the victim for `steal`), and steal's checkpoint records what passed through it."""
    forbidden = re.compile(
        r"^\s*(from|import)\s.*(stages\.training|stages\.deploy|victim|jit|blackbox|defenses)|torch\.jit", re.MULTILINE
    )
    doors = {"blackbox.py", "checkpoint.py"}
    attacks = [p for p in Path(steal.__file__).parent.joinpath("attacks").glob("*.py") if p.name not in doors]
    assert len(attacks) >= 9  # every attack's file, the thief's base and the registry
    for path in attacks:
        assert not forbidden.search(path.read_text()), path


def test_steal_end_to_end_through_the_cli(world, tmp_path):
    out = tmp_path / "surrogate.h5"
    result = CliRunner().invoke(
        cli.app,
        [
            "steal",
            "--victim",
            str(world["victim"]),
            "--pool",
            str(world["pool"]),
            "--budget",
            "300",
            "--epochs",
            "3",
            "--defense",
            "reverse-sigmoid",
            "--defense-param",
            "beta=0.5",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    with open_artifact(out, "surrogate") as f:
        history = {k: f["history"][k][()] for k in f["history"]}
        assert len(history["stealing_accuracy"]) == 3
        assert f.attrs["stealing_accuracy"] == history["stealing_accuracy"][-1]
        assert f.attrs["max_stealing_accuracy"] == history["stealing_accuracy"].max()
        assert 0 <= f.attrs["fidelity"] <= 1
        assert f.attrs["defense"] == "reverse-sigmoid" and json.loads(f.attrs["defense_params"])["beta"] == 0.5
        answers = f["transfer/answers"][()]
        assert answers.shape == (300, 10) and np.allclose(answers.sum(1), 1, atol=1e-5)
        assert f["transfer/images"].dtype == np.uint8 and f["transfer/images"].shape == (300, 1, 28, 28)
        inputs = json.loads(f.attrs["inputs"])
        assert {Path(i["path"]).name for i in inputs} == {"victim.h5", "digits.h5", "pool16.h5"}
        assert all(len(i["sha256"]) == 64 for i in inputs)
        surrogate = models.build_model(f.attrs["arch"], 10, 1, 28, [0.5], [0.25])
        surrogate.load_state_dict(load_state(f["weights"]))


def test_steal_a_deployed_victim_pt(world, tmp_path):
    runner = CliRunner()
    pt = tmp_path / "victim.pt"
    assert (
        runner.invoke(
            cli.app, ["export", "--victim", str(world["victim"]), "--out", str(pt), "--defense", "top1"]
        ).exit_code
        == 0
    )
    out = tmp_path / "s.h5"
    result = runner.invoke(
        cli.app,
        [
            "steal",
            "--victim",
            str(pt),
            "--pool",
            str(world["pool"]),
            "--budget",
            "120",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    with open_artifact(out, "surrogate") as f:
        assert f.attrs["baked_defense"] == "top1"
        answers = f["transfer/answers"][()]
        assert set(np.unique(answers)) <= {0.0, 1.0}  # the baked top-1 answered


BAD = [
    (["--budget", "0"], "budget"),
    (["--budget", "-5"], "budget"),
    (["--no-convert"], "--no-convert"),
    (["--defense", "mad", "--defense-param", "eps=-0.5"], "must be in"),
    (["--defense", "mad", "--defense-param", "foo=1"], "no parameter 'foo'"),
    (["--defense", "nope"], "unknown defense"),
    (["--attack", "nope"], "unknown attack"),
    (["--attack", "dfme", "--label", "hard"], "needs --label soft"),
    (["--attack", "knockoff-confident", "--label", "hard"], "needs --label soft"),  # top-1 labels show no confidence
    (["--attack", "confidence-search", "--label", "hard"], "needs --label soft"),
    (["--attack-param", "smoothing=2"], "no parameter 'smoothing'"),
    (["--arch", "alexnet"], "unknown architecture"),
    (["--defense", "adaptive-misinformation"], "no misinformation network"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_fails_in_one_line_without_output(world, tmp_path, extra, message):
    out = tmp_path / "s.h5"
    args = [
        "steal",
        "--victim",
        str(world["victim"]),
        "--budget",
        "50",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    if "--attack" not in extra or "dfme" not in extra:
        args += ["--pool", str(world["pool"])]
    result = CliRunner().invoke(cli.app, args + extra)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_knockoff_needs_a_pool(world, tmp_path):
    result = CliRunner().invoke(cli.app, ["steal", "--victim", str(world["victim"]), "--out", str(tmp_path / "s.h5")])
    assert result.exit_code == 1 and "needs --pool" in result.stderr


def test_jbda_jitter_scales_each_pixel_s_step_within_its_range_and_breaks_the_single_magnitude():
    """jitter 0 is the official sign step; jitter 0.2 moves every unclipped pixel by lambda times a draw in
    [0.8, 1.2], both ways, so the step is no longer of one magnitude (the pattern the monitor reads)."""
    torch.manual_seed(0)
    surrogate = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x = torch.full((4, 1, 8, 8), 0.5)  # mid-grey: no pixel is clipped
    labels = torch.tensor([0, 1, 2, 0])
    for jitter in (0.0, 0.2):
        thief = SimpleNamespace(surrogate=surrogate, rng=torch.Generator().manual_seed(1))
        moved = (JBDA(step=0.25, jitter=jitter)._step(thief, x, labels) - x).flatten(1)
        size = moved.abs()
        if jitter == 0:
            assert torch.allclose(size, torch.full_like(size, 0.25))
            assert detectors.sign_steps(moved.numpy()).all()
        else:
            assert size.min() >= 0.25 * 0.8 - 1e-6 and size.max() <= 0.25 * 1.2 + 1e-6 and size.std() > 0.01
            assert not detectors.sign_steps(moved.numpy()).any()
        assert (moved > 0).any() and (moved < 0).any()


def test_jbda_sparse_steps_only_the_pixels_of_largest_gradient():
    """sparse 0.25 moves a quarter of each image's pixels, the ones whose surrogate gradient is largest, by lambda;
    the rest stay put."""
    torch.manual_seed(0)
    surrogate = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x = torch.full((4, 1, 8, 8), 0.5)
    labels = torch.tensor([0, 1, 2, 0])
    thief = SimpleNamespace(surrogate=surrogate, rng=torch.Generator().manual_seed(1))
    moved = (JBDA(step=0.25, sparse=0.25)._step(thief, x, labels) - x).flatten(1)
    assert ((moved.abs() > 0).sum(1) == 16).all()
    assert torch.allclose(moved[moved != 0].abs(), torch.full((64,), 0.25))
    weights = surrogate[1].weight.detach()[labels].abs()  # a linear surrogate: the gradient is its label's row
    assert (weights[moved != 0].view(4, 16).min(1).values >= weights[moved == 0].view(4, 48).max(1).values).all()

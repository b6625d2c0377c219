"""The OOD stream of train-ini (induction meant to hold on pools the defense never saw): mixtures balanced per set,
heavy augmentation, outliers derived from ID images, and the broad preset end to end on tiny data."""

import h5py
import pytest
import torch

from stages.ini import ood as _ood
from stages.training.torchrun import Ranks
from tests.conftest import assert_one_line_error, invoke


def _digits(n: int = 32, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ID images with a bright vertical bar whose column encodes the class."""
    x = torch.zeros(n, 1, size, size)
    y = torch.arange(n) % 10
    for i, c in enumerate(y.tolist()):
        x[i, 0, 4:24, 2 + 2 * c] = 1.0
    return x, y


def test_mixture_is_balanced_per_set_whatever_their_sizes():
    big = torch.full((1000, 1, 28, 28), 10, dtype=torch.uint8)
    small = torch.full((7, 1, 28, 28), 200, dtype=torch.uint8)
    stream = _ood.OodStream([big, small], 64, False, Ranks())
    stream.begin(torch.Generator().manual_seed(0))
    batch = stream.next(torch.Generator().manual_seed(1))
    values = (batch[:, 0, 0, 0] * 255).round()
    assert batch.shape == (64, 1, 28, 28)
    assert (values == 10).sum() == 32 and (values == 200).sum() == 32  # 7 images cycled to fill their half


def test_derived_fraction_and_kinds():
    x, y = _digits()
    src = torch.zeros(50, 1, 28, 28, dtype=torch.uint8)
    stream = _ood.OodStream([src], 40, False, Ranks(), derived=("shuffle", "mix", "corrupt"), derived_fraction=0.5)
    stream.begin(torch.Generator().manual_seed(0))
    batch = stream.next(torch.Generator().manual_seed(1), x, y)
    assert batch.shape == (40, 1, 28, 28)
    assert batch[:20].abs().sum() == 0  # the drawn half: the all-black source
    assert batch[20:].flatten(1).sum(1).gt(0).all()  # every derived image keeps some ink
    with pytest.raises(ValueError, match="need the ID batch"):
        stream.next(torch.Generator())


def test_shuffle_permutes_patches_and_keeps_the_ink():
    x, y = _digits(8)
    out = _ood.derive(x, y, ["shuffle"], 8, torch.Generator().manual_seed(0))
    src_patches = x.unfold(2, 7, 7).unfold(3, 7, 7).reshape(8, 16, 49)
    out_patches = out.unfold(2, 7, 7).unfold(3, 7, 7).reshape(8, 16, 49)
    # every output is one input's 16 patches in another order: same multiset of patch sums, not the same image
    sums = src_patches.sum(-1).sort(1).values
    out_sums = out_patches.sum(-1).sort(1).values
    assert any(torch.allclose(o, s) for o in out_sums for s in sums)
    assert all(not any(torch.equal(o, s) for s in x) for o in out)


def test_mix_blends_two_different_classes():
    x, y = _digits(20)
    out = _ood.derive(x, y, ["mix"], 20, torch.Generator().manual_seed(0))
    for img in out:
        lit = (img[0, 10] > 0).nonzero().flatten()  # one row through the bars: two columns lit, weights sum to 1
        assert len(lit) == 2
        assert torch.isclose(img[0, 10, lit].sum(), torch.tensor(1.0))
        assert img[0, 10, lit].min() >= 0.35 - 1e-6


def test_corrupt_erases_half_and_adds_noise():
    x = torch.full((16, 1, 28, 28), 0.5)
    out = _ood.derive(x, None, ["corrupt"], 16, torch.Generator().manual_seed(0))
    zero = (out == 0).flatten(1).float().mean(1)
    assert (zero >= 0.5).all()  # the erased half, plus noise clipped at 0
    assert out.std() > 0.2


def test_heavy_augment_inverts_and_stays_in_range():
    x = torch.zeros(200, 1, 28, 28)
    out = _ood.heavy_augment(x, torch.Generator().manual_seed(0))
    inverted = out.flatten(1).mean(1) > 0.5
    assert 0.3 < inverted.float().mean() < 0.7
    assert out.min() >= 0 and out.max() <= 1


def test_same_seed_same_batches():
    x, y = _digits()
    src = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    batches = []
    for _ in range(2):
        stream = _ood.OodStream([src], 32, True, Ranks(), derived=("mix", "corrupt"), heavy=True)
        g = torch.Generator().manual_seed(7)
        stream.begin(g)
        batches.append(torch.cat([stream.next(g, x, y) for _ in range(3)]))
    assert torch.equal(*batches)


def test_train_ini_broad_preset_on_tiny_data(tiny, tmp_path):
    gen = tmp_path / "gen.h5"
    assert invoke("prepare", "--dataset", "generated", "--limit", 300, "--out", gen).exit_code == 0
    out = tmp_path / "v.h5"
    result = invoke(
        "train-ini",
        "--dataset",
        tiny,
        "--preset",
        "broad",
        "--ood",
        f"{gen},{gen.with_name('gen2.h5')}",
        "--epochs",
        1,
        "--out",
        out,
        "--diagnostic-images",
        32,
    )
    assert "gen2.h5" in assert_one_line_error(result)  # a missing mixture member is named
    result = invoke(
        "train-ini",
        "--dataset",
        tiny,
        "--preset",
        "broad",
        "--ood",
        str(gen),
        "--epochs",
        1,
        "--out",
        out,
        "--diagnostic-images",
        32,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        params = f.attrs["params"]
        assert '"ood_derived": "shuffle,mix,corrupt"' in params and '"ood_augment": "heavy"' in params
        assert '"ood_derived_fraction": 0.25' in params
        assert '"on_collapse": "rollback"' in params and '"pcgrad_reduction": "sum"' in params
        assert '"clip": "spike"' in params
        assert f["history/train_vanishing"].shape == (1,)
        assert list(f["history/rolled_back"][()]) == [0.0]


def test_unknown_collapse_policy_is_one_line(tiny, tmp_path):
    result = invoke("train-ini", "--dataset", tiny, "--on-collapse", "retry", "--out", tmp_path / "v.h5")
    assert "retry" in assert_one_line_error(result, code=2)
    assert not (tmp_path / "v.h5").exists()


def test_unknown_derived_kind_is_one_line(tiny, tmp_path):
    result = invoke("train-ini", "--dataset", tiny, "--ood-derived", "shuffle,blur", "--out", tmp_path / "v.h5")
    assert "blur" in assert_one_line_error(result)
    assert not (tmp_path / "v.h5").exists()


@pytest.mark.parametrize(
    "history,expected",
    [
        ([0.96, 0.10, 0.10, 0.10], 2),  # the broad run that collapsed at epoch 2
        ([0.96, 0.97, 0.98], 0),
        ([0.10, 0.11, 0.50], 0),  # never good yet: not a collapse
        ([0.9, 0.1, 0.9, 0.1], 4),  # recovered once, then fell again
    ],
)
def test_collapse_is_detected_from_val_history(history, expected):
    from stages.training import loop as _loop

    assert _loop.collapse_epoch(history, 10) == expected


def _nets(seed: int = 0):
    import models

    torch.manual_seed(seed)
    victim = models.build_model("lenet5", 10, 1, 28, [0.1307], [0.3081]).train()
    torch.manual_seed(seed + 1)
    surrogate = models.build_model("lenet5", 10, 1, 28, [0.1307], [0.3081]).eval().requires_grad_(False)
    return victim, surrogate


def test_synthetic_outliers_raise_the_disagreement_inside_the_ball():
    victim, surrogate = _nets()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    synth = _ood.Synthetic(victim, [surrogate], fraction=0.5, steps=5, eps=0.2)
    out = synth(x, torch.Generator().manual_seed(4))
    again = synth(x, torch.Generator().manual_seed(4))
    assert torch.equal(out, again)  # same generator, same outliers
    assert torch.equal(out[8:], x[8:])  # only the first half is replaced
    assert (out[:8] - x[:8]).abs().max() <= 0.2 + 1e-6 and out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        before, after = synth.gap(x[:8]), synth.gap(out[:8])
    assert after.mean() > 1.2 * before.mean()  # ascent found where the victim tells more than the surrogate
    assert victim.training and not surrogate.training  # modes restored
    assert all(p.grad is None for p in victim.parameters())  # only input gradients


def test_ood_stream_hands_its_batch_to_the_synthesizer():
    stream = _ood.OodStream(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), 10, False, Ranks())
    stream.begin(torch.Generator().manual_seed(0))
    seen = []
    stream.synthesize = lambda x, g: seen.append(x.shape) or x * 0
    assert stream.next(torch.Generator()).abs().sum() == 0 and seen == [(10, 1, 28, 28)]


def test_train_ini_with_synthetic_outliers_on_tiny_data(tiny, tmp_path):
    out = tmp_path / "v.h5"
    result = invoke(
        "train-ini",
        "--dataset",
        tiny,
        "--ood-synthetic",
        0.5,
        "--ood-synthetic-steps",
        2,
        "--epochs",
        1,
        "--out",
        out,
        "--diagnostic-images",
        32,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        assert '"ood_synthetic": 0.5' in f.attrs["params"] and '"ood_synthetic_steps": 2' in f.attrs["params"]
        assert f["history/train_vanishing"].shape == (1,)
    for bad in (("--ood-synthetic", 1.5), ("--ood-synthetic", 0.5, "--ood-synthetic-eps", 0)):
        result = invoke("train-ini", "--dataset", tiny, *bad, "--out", tmp_path / "w.h5")
        assert_one_line_error(result)
        assert not (tmp_path / "w.h5").exists()


def _sabotaging_fit(tiny, out, rollbacks: int, resume: bool = False, stop_after: int = 6):
    """A small ReLU network that learns `tiny` in one epoch, trained by the real loop with a step that kills it at
    the end of epoch 2 as a real collapse does: every hidden ReLU dead (no gradient flows back through them ever
    again), one class's bias ahead, so one answer for everything."""
    from stages.data import prepared as _data
    from stages.training import loop as _loop

    data = _data.load(tiny)
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))
    calls = {"n": 0}
    steps = -(-len(data.splits["train"][1]) // 32)

    def step(x, y, gen):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if calls["n"] == 2 * steps and not resume:
            with torch.no_grad():
                model[1].weight.zero_()
                model[1].bias.fill_(-1.0)
                model[3].bias.copy_(torch.tensor([5.0] + [0.0] * 9))
            for p in model.parameters():
                p.grad = None
        return {"benign": loss.detach()}

    recipe = _loop.VictimRecipe(
        epochs=stop_after,
        batch_size=32,
        lr=0.1,
        momentum=0.5,
        weight_decay=0.0,
        lr_step=20,
        lr_gamma=0.1,
        seed=0,
        device="cpu",
        augment=False,
    )
    return model, _loop.fit(model, data, step, recipe, out, "fp", resume=resume, rollbacks=rollbacks)


def test_collapse_is_rolled_back_to_the_best_epoch_with_the_learning_rate_halved(tiny, tmp_path, one_thread):
    _, kept = _sabotaging_fit(tiny, tmp_path / "warn.h5", rollbacks=0, stop_after=4)
    assert "rolled_back" not in kept.history
    assert kept.history["val_accuracy"][0] >= 0.5 and max(kept.history["val_accuracy"][1:]) <= 0.1  # dead for good

    _, rolled = _sabotaging_fit(tiny, tmp_path / "roll.h5", rollbacks=3, stop_after=4)
    assert rolled.history["rolled_back"] == [0.0, 1.0, 0.0, 0.0]
    assert rolled.history["lr"] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    assert min(rolled.history["val_accuracy"][2:]) >= 0.5  # trained on from epoch 1's weights
    assert rolled.chosen_epoch != 2


def test_rollback_resumes_exactly(tiny, tmp_path, one_thread):
    out = tmp_path / "v.h5"
    whole, _ = _sabotaging_fit(tiny, tmp_path / "whole.h5", rollbacks=3, stop_after=4)
    _sabotaging_fit(tiny, out, rollbacks=3, stop_after=3)  # the checkpoint after epoch 3 (rolled back at 2)
    resumed, result = _sabotaging_fit(tiny, out, rollbacks=3, resume=True, stop_after=4)
    assert result.history["lr"][-1] == pytest.approx(0.05)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)

"""train-ini: every loss term against a hand computation, PCGrad's projection properties, the fast step equal to the
reference, resume equal to an uninterrupted run, a two-process torchrun, and one-line errors on bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke
from tiny_data import write_dataset
from torch import nn

import models
from models.params import UserError
from stages.core.artifacts import load_state
from stages.ini import fast, objective, ood, reference
from stages.training import loop as _loop
from stages.training.torchrun import Ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A learnable 1x28x28 dataset and an RGB 32x32 OOD set (converted by train-ini)."""
    folder = tmp_path_factory.mktemp("ini")
    return (write_dataset(folder / "id.h5"), write_dataset(folder / "ood.h5", name="ood", shape=(3, 32, 32), seed=3))


# ------------------------------------------------------------------------------------------------ terms by hand


def test_distances_by_hand():
    v = torch.tensor([[0.0, math.log(2.0)]])  # p_V = (1/3, 2/3); centred log p_V = (-ln2/2, +ln2/2)
    c = torch.tensor([[1.0, -1.0]])
    assert objective.distance_sum(v, c, "l1").item() == pytest.approx(1 + math.log(2) / 2)
    c0 = torch.zeros(1, 2)  # p_C = (1/2, 1/2)
    kl_v_c = 1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(4 / 3)
    kl_c_v = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    assert objective.distance_sum(v, c0, "kl").item() == pytest.approx(kl_v_c)
    assert objective.divergence_sum(c0, v, "official").item() == pytest.approx(kl_c_v)
    assert objective.divergence_sum(c0, v, "attacker").item() == pytest.approx(kl_v_c)
    assert objective.distance_sum(v.repeat(3, 1), c.repeat(3, 1), "l1").item() == pytest.approx(
        3 * (1 + math.log(2) / 2)
    )


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        net[1].weight.copy_(weight)
        net[1].bias.copy_(bias)
    return net.double()


class _FixedOod:
    def __init__(self, x):
        self.x = x

    def next(self, _gen, *_id_batch):
        return self.x


def _softmax_jacobian_product(p: np.ndarray, a: np.ndarray) -> np.ndarray:
    """d/dz sum_k p_k a_k with a = log p_C - log p_V fixed in log p_V: p * (a - <p, a>) (per row)."""
    return p * (a - (p * a).sum(1, keepdims=True))


def test_each_term_against_a_hand_computation():
    """A linear victim and a linear surrogate, so every gradient has a closed form (no autograd in the check)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 2, 2, generator=g, dtype=torch.float64)
    x_ood = torch.rand(4, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    Wv, bv = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    Wc, bc = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    victim, surrogate = _linear(Wv, bv), _linear(Wc, bc).eval().requires_grad_(False)
    weights = objective.Objective(beta=0.5, pcgrad=False, max_grad_norm=1e9)
    terms = reference.ReferenceStep(victim, [surrogate], _FixedOod(x_ood), weights, Ranks())(x, y, torch.Generator())

    X, Xo = x.flatten(1).numpy(), x_ood.flatten(1).numpy()
    zv, zc = X @ Wv.numpy().T + bv.numpy(), X @ Wc.numpy().T + bc.numpy()
    zvo, zco = Xo @ Wv.numpy().T + bv.numpy(), Xo @ Wc.numpy().T + bc.numpy()

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lv, lc, lvo, lco = map(log_softmax, (zv, zc, zvo, zco))
    centred = lambda z: z - z.mean(1, keepdims=True)  # noqa: E731
    assert terms["benign"].item() == pytest.approx(-lv[np.arange(5), y.numpy()].mean())
    assert terms["id_distance"].item() == pytest.approx(-np.abs(zc - centred(lv)).mean())
    assert terms["ood_distance"].item() == pytest.approx(np.abs(zco - centred(lvo)).mean())

    def surrogate_grad(u, inputs):  # d/d(W, b) of sum_n u_n . (W x_n + b), over the batch
        return np.concatenate([(u.T @ inputs).ravel(), u.sum(0)])

    pc, pco = np.exp(lc), np.exp(lco)
    g_adv = surrogate_grad(_softmax_jacobian_product(pc, lc - lv) / 5, X)  # grad of KL(p_C || p_V), batch mean
    onehot = np.eye(3)[y.numpy()]
    g_exp = surrogate_grad((pc - onehot) / 5, X)  # grad of CE(C(x), y)
    cos = g_adv @ g_exp / np.linalg.norm(g_adv) / np.linalg.norm(g_exp)
    assert terms["isolation"].item() == pytest.approx(cos)
    g_ood = surrogate_grad(_softmax_jacobian_product(pco, lco - lvo) / 4, Xo)
    assert terms["vanishing"].item() == pytest.approx(np.abs(g_ood).mean())
    total = (
        terms["benign"]
        + 0.5 * terms["id_distance"]
        + 0.3 * terms["ood_distance"]
        + terms["isolation"]
        + 1000 * terms["vanishing"]
    )
    assert terms["total"].item() == pytest.approx(total.item())


# ------------------------------------------------------------------------------------------------ PCGrad


def test_pcgrad_leaves_agreeing_gradients_alone():
    grads = torch.tensor([[1.0, 0.0, 1.0], [0.5, 1.0, 0.0], [0.0, 2.0, 1.0]])
    touched = torch.ones_like(grads, dtype=torch.bool)
    merged = objective.pcgrad(grads, touched, torch.Generator().manual_seed(0), "mean")
    assert torch.allclose(merged, grads.mean(0))
    assert torch.allclose(objective.pcgrad(grads, touched, torch.Generator(), "sum"), grads.sum(0))


def test_pcgrad_projects_conflicts_onto_the_normal_plane():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1 . g2 = -1 < 0
    grads, touched = torch.stack([g1, g2]), torch.ones(2, 2, dtype=torch.bool)
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2  # (0.5, 0.5)
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1  # (0, 1)
    assert p1 @ g2 == pytest.approx(0) and p2 @ g1 == pytest.approx(0)  # each is orthogonal to the other term
    merged_sum = objective.pcgrad(grads, touched, torch.Generator().manual_seed(1), "sum")
    merged_mean = objective.pcgrad(grads, touched, torch.Generator().manual_seed(1), "mean")
    assert torch.allclose(merged_sum, p1 + p2) and torch.allclose(merged_mean, (p1 + p2) / 2)


def test_pcgrad_sums_parameters_not_every_term_touches():
    grads = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    touched = torch.tensor([[True, True], [True, False]])  # the second term never reaches parameter 1
    merged = objective.pcgrad(grads, touched, torch.Generator(), "mean")
    assert torch.allclose(merged, torch.tensor([2.0, 2.0]))  # shared: mean; unshared: sum


def test_pcgrad_from_the_gram_matrix_matches_the_flat_one():
    grads = torch.randn(5, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    touched = torch.ones_like(grads, dtype=torch.bool)
    for reduction in objective.REDUCTIONS:
        flat = objective.pcgrad(grads, touched, torch.Generator().manual_seed(3), reduction)
        mixed = objective.pcgrad_coefficients(grads @ grads.T, torch.Generator().manual_seed(3), reduction) @ grads
        assert torch.allclose(flat, mixed, atol=1e-12)


# ------------------------------------------------------------------------------------------------ fast == reference


def _lenet(seed: int, dtype=torch.float64, channels: int = 1, size: int = 28) -> nn.Module:
    torch.manual_seed(seed)
    return models.build_model("lenet5", 10, channels, size, [0.3] * channels, [0.3] * channels).to(dtype)


class _DoubleOod(ood.OodStream):
    def next(self, generator, *id_batch):
        return super().next(generator, *id_batch).double()


def _spike(mean: float) -> objective.SpikeClip:
    """A spike clip past its warm-up whose running mean makes it bind (limit = 2 x mean)."""
    spike = objective.SpikeClip(2.0, warmup=3)
    spike.mean.fill_(mean)
    spike.steps.fill_(3)
    return spike


@pytest.mark.parametrize(
    "weights,k,shape,spike_mean",
    [
        (objective.Objective(), 1, (1, 28), None),
        (
            objective.Objective(beta=0.2, distance="kl", kl_direction="attacker", pcgrad_reduction="sum"),
            2,
            (1, 28),
            None,
        ),
        (objective.Objective(pcgrad=False), 1, (1, 28), None),
        (objective.Objective(clip_pcgrad=True, max_grad_norm=1e-3), 1, (1, 28), None),  # the clip binds
        (objective.Objective(), 1, (1, 28), 1e-4),  # --clip spike binds
        (objective.Objective(), 1, (3, 32), None),  # the RGB variant: no conv1 padding
    ],
)
def test_fast_step_equals_reference(weights, k, shape, spike_mean):
    channels, size = shape
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, channels, size, size, generator=g, dtype=torch.float64)
    x[:, :, :6] = 0  # flat rows: max-pool ties, where the fast step must pick max_pool2d's element
    y = torch.randint(0, 10, (24,), generator=g)
    ood = torch.randint(0, 256, (40, channels, size, size), dtype=torch.uint8, generator=g)
    results = []
    for cls in (reference.ReferenceStep, fast.FastStep):
        victim = _lenet(1, channels=channels, size=size)
        surrogates = [_lenet(2 + i, channels=channels, size=size).eval().requires_grad_(False) for i in range(k)]
        stream = _DoubleOod(ood, 20, False, Ranks())
        stream.begin(torch.Generator().manual_seed(5))
        extra = (size, fast.EAGER) if cls is fast.FastStep else ()
        spike = None if spike_mean is None else _spike(spike_mean)
        optimizer = torch.optim.SGD(victim.parameters(), lr=0.1, momentum=0.5, weight_decay=1e-3)
        terms = cls(victim, surrogates, stream, weights, Ranks(), *extra, spike=spike)(
            x, y, torch.Generator().manual_seed(7)
        )
        if spike is not None:
            assert spike.clipped == 1 and spike.mean == pytest.approx(
                1e-4 + (2e-4 - 1e-4) / 4
            )  # clipped, then averaged
        optimizer.step()
        results.append((terms, [p.detach().clone() for p in victim.parameters()]))
    (ref_terms, ref_params), (fast_terms, fast_params) = results
    for key in ref_terms:
        assert fast_terms[key].item() == pytest.approx(ref_terms[key].item(), rel=1e-5, abs=1e-10), key
    before = [p.detach() for p in _lenet(1, channels=channels, size=size).parameters()]
    for p0, a, b in zip(before, ref_params, fast_params, strict=True):
        assert torch.allclose(a - p0, b - p0, rtol=1e-5, atol=1e-12)


needs_compiler = pytest.mark.skipif(not fast.compiler_available(), reason="torch.compile needs a C++ compiler")


@needs_compiler
def test_compiled_fast_step_equals_reference(monkeypatch):
    """The compiled kernels (train-ini --compile on) keep the maths: same check as the eager fast step."""
    kernels = fast.compiled_kernels(strict=True)
    eager_init = fast.FastStep.__init__
    monkeypatch.setattr(fast.FastStep, "__init__", lambda self, *a, spike=None: eager_init(self, *a[:-1], kernels))
    test_fast_step_equals_reference(objective.Objective(), 1, (1, 28), None)
    assert kernels.forward.compiled is not None and kernels.jvp.compiled is not None  # compiled, not fallen back


def test_compile_auto_only_where_it_pays_back(monkeypatch):
    monkeypatch.setattr(fast, "compiler_available", lambda: True)
    monkeypatch.setattr(fast, "compiled_kernels", lambda *a: "compiled")
    long = fast.COMPILE_MIN_STEPS
    said = []
    assert fast.kernels_for("auto", True, "cpu", long, said.append) == "compiled" and len(said) == 1
    assert fast.kernels_for("auto", True, "cpu", long - 1) is fast.EAGER  # short runs: not worth it
    assert fast.kernels_for("auto", False, "cpu", long) is fast.EAGER  # reference step: nothing to fuse
    assert fast.kernels_for("auto", True, "cuda", long) is fast.EAGER  # measured on CPU only
    assert fast.kernels_for("off", True, "cpu", long) is fast.EAGER
    assert fast.kernels_for("on", True, "cpu", 1, said.append) == "compiled"
    monkeypatch.setattr(fast, "compiler_available", lambda: False)
    assert fast.kernels_for("auto", True, "cpu", long) is fast.EAGER


def test_compile_on_without_a_compiler_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(fast, "compiler_available", lambda: False)
    out = tmp_path / "v.h5"
    line = assert_one_line_error(
        invoke("train-ini", "--dataset", tiny[0], "--ood", tiny[1], "--compile", "on", "--device", "cpu", "--out", out)
    )
    assert "no C++ compiler" in line and not out.exists()


def test_compile_failure_falls_back_to_eager_or_fails_in_one_line():
    def broken(*args):
        raise RuntimeError("InductorError: no compiler\nlong trace")

    said = []
    kernel = fast._Compiled(lambda a: a + 1, False, said.append)
    kernel.compiled = broken
    assert kernel(1) == 2 and kernel.compiled is None and "no compiler" in said[0]  # auto: eager from now on
    strict = fast._Compiled(lambda a: a + 1, True, said.append)
    strict.compiled = broken
    with pytest.raises(UserError, match="torch.compile failed .RuntimeError: InductorError: no compiler.$"):
        strict(1)


# torch.func.jvp's first call loads forward-mode decompositions through torch.jit.script (torch's own call, not ours)
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script` is deprecated:FutureWarning")
def test_tape_matches_autograd_jacobian_products():
    from torch.func import functional_call, jvp, vjp

    model = _lenet(4)
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    tape = fast.Tape(model, x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert torch.allclose(tape.z, model(x))
    _, pullback = vjp(lambda p: functional_call(model, p, (x,)), params)
    cot = torch.randn(6, 2, 10, dtype=torch.float64)
    mine = tape.vjp(cot)
    for t in range(2):
        for mine_p, ref_p in zip(mine, pullback(cot[:, t])[0].values(), strict=True):
            assert torch.allclose(mine_p[t], ref_p, atol=1e-12)
    tangent = [torch.randn(1, *p.shape, dtype=torch.float64) for p in params.values()]
    _, ref = jvp(
        lambda p: functional_call(model, p, (x,)), (params,), ({k: t[0] for k, t in zip(params, tangent, strict=True)},)
    )
    assert torch.allclose(tape.jvp(tangent)[:, 0], ref, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the stage


def _train(tiny, out, *extra):
    data, ood = tiny
    return invoke(
        "train-ini",
        "--dataset",
        data,
        "--ood",
        ood,
        "--epochs",
        2,
        "--batch-size",
        64,
        "--device",
        "cpu",
        "--diagnostic-images",
        32,
        "--out",
        out,
        *extra,
    )


def test_stage_writes_a_victim_with_history_and_diagnostics(tiny, tmp_path):
    out = tmp_path / "v.h5"
    result = _train(tiny, out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    with h5py.File(out, "r") as f:
        assert f.attrs["schema"] == "victim/1" and f.attrs["objective"] == "ini"
        history = f["history"]
        for key in (
            "train_benign",
            "train_id_distance",
            "train_ood_distance",
            "train_isolation",
            "train_vanishing",
            "val_accuracy",
            "test_accuracy",
            "diag_ood_l1",
            "diag_id_cosine",
            "diag_ood_l1_fresh",
        ):
            assert len(history[key]) == 2 and np.all(np.isfinite(history[key][()])), key
        assert "ini_surrogate0" in f
    assert not _loop.checkpoint_path(out).exists()


@needs_compiler
def test_compile_on_trains_and_records_it(tiny, tmp_path):
    out = tmp_path / "v.h5"
    result = _train(tiny, out, "--compile", "on", "--epochs", 1)
    assert result.exit_code == 0, result.stderr
    with h5py.File(out, "r") as f:
        params = json.loads(f.attrs["params"])
        assert params["compile_mode"] == "on" and params["implementation"] == "fast"
        assert 0.05 < f["history/test_accuracy"][-1] <= 1 and np.isfinite(f["history/train_isolation"][()]).all()


def test_resume_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    extra = ("--surrogates", 2, "--refresh-every", 1, "--refresh", "distill", "--refresh-steps", 2)
    full = tmp_path / "full.h5"
    assert _train(tiny, full, *extra).exit_code == 0
    resumed = tmp_path / "resumed.h5"
    original = _loop._write_checkpoint

    def crash_after_first_epoch(*args):
        original(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(_loop, "_write_checkpoint", crash_after_first_epoch)
    assert _train(tiny, resumed, *extra).exit_code != 0
    monkeypatch.setattr(_loop, "_write_checkpoint", original)
    result = _train(tiny, resumed, *extra, "--resume")
    assert result.exit_code == 0, result.stderr
    with h5py.File(full, "r") as a, h5py.File(resumed, "r") as b:
        for group in ("weights", "ini_surrogate0", "ini_surrogate1"):
            wa, wb = load_state(a[group]), load_state(b[group])
            assert all(torch.equal(wa[k], wb[k]) for k in wa), group
        assert np.array_equal(a["history/train_isolation"][()], b["history/train_isolation"][()])


@pytest.mark.parametrize("implementation", ["fast", "reference"])
def test_torchrun_two_processes_match_one(tiny, tmp_path, implementation):
    """gloo on CPU; each rank takes half of every batch, and the result equals the single-process run."""
    single, double = tmp_path / "one.h5", tmp_path / "two.h5"
    common = ["--epochs", 1, "--batch-size", 64, "--diagnostic-images", 0, "--implementation", implementation]
    assert _train(tiny, single, *common).exit_code == 0
    data, ood = tiny
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "cli.py"),
            "train-ini",
            "--dataset",
            str(data),
            "--ood",
            str(ood),
            "--device",
            "cpu",
            "--out",
            str(double),
            *map(str, common),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(double)  # only rank 0 prints its path
    with h5py.File(single, "r") as a, h5py.File(double, "r") as b:
        wa, wb = load_state(a["weights"]), load_state(b["weights"])
        assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
        assert b.attrs["params"].count('"processes": 2') == 1


def _victim_file(tiny, tmp_path) -> Path:
    out = tmp_path / "victim.h5"
    assert _train(tiny, out, "--epochs", 1).exit_code == 0
    return out


@pytest.mark.parametrize(
    "case",
    [
        "unknown-ood",
        "ood-wrong-schema",
        "ood-not-hdf5",
        "ood-is-id",
        "bad-surrogate-arch",
        "fast-needs-lenet",
        "bad-distance",
        "compile-needs-fast",
        "bad-compile",
    ],
)
def test_bad_input_is_one_line(case, tiny, tmp_path):
    data, _ = tiny
    out = tmp_path / "v.h5"
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    args = {
        "unknown-ood": ("--ood", "imagenet-21k"),
        "ood-wrong-schema": ("--ood", _victim_file(tiny, tmp_path) if case == "ood-wrong-schema" else None),
        "ood-not-hdf5": ("--ood", text),
        "ood-is-id": ("--ood", data),
        "bad-surrogate-arch": ("--surrogate-archs", "lenet5,alexnet"),
        "fast-needs-lenet": ("--arch", "resnet18", "--implementation", "fast"),
        "bad-distance": ("--distance", "l2"),
        "compile-needs-fast": ("--implementation", "reference", "--compile", "on"),
        "bad-compile": ("--compile", "sometimes"),
    }[case]
    result = invoke(
        "train-ini",
        "--dataset",
        data,
        "--epochs",
        1,
        "--device",
        "cpu",
        "--out",
        out,
        *(["--ood", tiny[1]] if args[0] != "--ood" else []),
        *args,
    )
    assert_one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize("mode", objective.BN_MODES)
def test_bn_mode_decides_what_ood_batches_do_to_batchnorm(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).train()
    bn = net[1]
    x, x_ood = torch.rand(8, 1, 6, 6), 3 + torch.rand(8, 1, 6, 6)
    net(x)
    after_id = bn.running_mean.clone()
    with objective.ood_batchnorm(net, mode):
        out = net(x_ood)
    assert torch.equal(bn.running_mean, after_id) == (mode not in ("mixed", "joint"))  # these blend OOD in
    assert bn.training and bn.track_running_stats  # restored
    if mode == "eval-ood":
        assert torch.allclose(out, net.eval()(x_ood))  # normalised by the (ID) running statistics
    else:
        fresh = nn.BatchNorm2d(3).train()
        fresh.load_state_dict(bn.state_dict())
        expected = net[3:](net[2](fresh(net[0](x_ood))))
        assert torch.allclose(out, expected, atol=1e-6)  # normalised by its own batch statistics


def test_joint_bn_mode_forwards_id_and_ood_as_one_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).train()
    x, x_ood = torch.rand(8, 1, 6, 6), 3 + torch.rand(5, 1, 6, 6)
    logits, logits_ood = objective.forward_id_and_ood(net, x, x_ood, "joint")
    assert int(net[1].num_batches_tracked) == 1 and logits.shape == (8, 2) and logits_ood.shape == (5, 2)
    reference = nn.BatchNorm2d(3).train()
    reference.load_state_dict(
        {k: v for k, v in net[1].state_dict().items()}
        | {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "num_batches_tracked": torch.tensor(0)}
    )
    both = net[3:](net[2](reference(net[0](torch.cat([x, x_ood])))))  # the mixture's batch statistics
    assert torch.allclose(logits, both[:8], atol=1e-6) and torch.allclose(logits_ood, both[8:], atol=1e-6)
    assert torch.allclose(net[1].running_mean, reference.running_mean)  # running statistics: the mixture's too
    objective.forward_id_and_ood(net, x, x_ood, "mixed")
    assert int(net[1].num_batches_tracked) == 3  # two forwards


def test_batchnorm_lenet_trains_with_ood_statistics_kept_out(tiny, tmp_path, one_thread):
    """lenet5_bn (the network the BatchNorm modes are measured on) through the CLI: the reference step, and with
    `separate` the victim's running statistics see ID batches only."""
    from stages.training import victim as _victim

    out = tmp_path / "bn.h5"
    result = invoke(
        "train-ini",
        "--dataset",
        tiny[0],
        "--ood",
        tiny[1],
        "--arch",
        "lenet5_bn",
        "--bn-mode",
        "separate",
        "--epochs",
        1,
        "--batch-size",
        32,
        "--device",
        "cpu",
        "--diagnostic-images",
        16,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        params = json.loads(f.attrs["params"])
    assert params["implementation"] == "reference" and params["bn_mode"] == "separate"
    assert params["pcgrad_reduction"] == "mean" and params["clip"] == "official"  # the faithful preset: as published
    model, _ = _victim.load(out)
    bn = model.net.bn1
    assert int(bn.num_batches_tracked) == 5  # 160 ID images in batches of 32: OOD batches never counted
    assert 0 < float(bn.running_var.min()) and float(bn.running_var.max()) < 10


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
def test_default_ood_is_the_papers_downloaded_as_the_victims_data_is_else_the_first_found(
    online, monkeypatch, tmp_path
):
    """train-ini without --ood on an MNIST victim: on a machine that is online, KMNIST (the paper's choice) is
    downloaded the way the victim's own dataset would be; offline the download fails and FashionMNIST, whose raw
    files are at hand, is prepared instead. Downloads are stubbed: online writes KMNIST's raw files."""
    from test_sources import idx_arrays, write_mnist

    from stages.data import prepared as _data
    from stages.data import raw as _raw_files

    root = tmp_path / "data"
    monkeypatch.chdir(tmp_path)  # prepared sets go to artifacts/data/ here
    monkeypatch.setattr(_data, "default_data_roots", lambda data_root: [root])
    write_mnist(root / "FashionMNIST" / "raw", idx_arrays(np.random.default_rng(0), n_train=20), gz=True)
    asked = []

    def download(name, data_roots, fetch):
        asked.append(name)
        if not online:
            return "network unreachable"
        write_mnist(data_roots[0] / "KMNIST" / "raw", idx_arrays(np.random.default_rng(1), n_train=30), gz=True)
        return ""

    monkeypatch.setattr(_raw_files, "download_into", download)
    mnist = type("D", (), {"name": "mnist", "shape": (1, 28, 28)})()
    chosen = ood.default_ood(mnist)
    expected = "kmnist" if online else "fashionmnist"
    assert asked == ["kmnist"] and chosen == [str(Path("artifacts/data") / f"{expected}.h5")]
    with h5py.File(chosen[0], "r") as f:
        assert f.attrs["name"] == expected
        assert len(f["train/labels"]) + len(f["val/labels"]) == (30 if online else 20)
    again = ood.default_ood(mnist)  # online, KMNIST is prepared now; offline, the paper's set is asked for again
    assert again == chosen and asked == ["kmnist"] * (1 if online else 2)


def test_default_ood_of_the_broad_preset_is_every_offline_family_but_the_victims_task(monkeypatch, tmp_path):
    from stages.data import prepared as _data

    monkeypatch.setattr(_data, "default_path", lambda name: tmp_path / f"{name}.h5")
    made = []

    def fake_prepare(dataset, out, download):
        assert download is False  # a mixture of many downloads would be a surprise
        if dataset == "emnist-letters":
            raise UserError("emnist-letters: no raw files found")
        made.append(dataset)
        out.write_bytes(b"")
        return out

    monkeypatch.setattr(_data, "prepare", fake_prepare)
    (tmp_path / "kmnist.h5").write_bytes(b"")  # prepared already
    mnist = type("D", (), {"name": "mnist", "shape": (1, 28, 28)})()
    names = [Path(p).stem for p in ood.default_ood(mnist, mixture=True)]
    assert names == ["fashionmnist", "kmnist", "skimage-patches", "generated"]
    assert made == ["fashionmnist", "skimage-patches", "generated"]  # not the victim's own, nor same-task digits


def test_spike_clip_averages_during_warmup_then_clips_spikes_and_resumes_from_its_buffers():
    spike = objective.SpikeClip(2.0, decay=0.9, warmup=3)
    for norm in (1.0, 3.0, 2.0):  # warm-up: nothing clipped, a plain mean
        assert spike(torch.tensor([norm, 0.0])).norm() == pytest.approx(norm)
    assert float(spike.mean) == pytest.approx(2.0) and float(spike.clipped) == 0
    copy = objective.SpikeClip(2.0, decay=0.9, warmup=3)
    copy.load_state_dict(spike.state_dict())  # what a checkpoint carries
    for clip in (spike, copy):
        out = clip(torch.tensor([0.0, 40.0]))  # a spike: 20x the mean
        assert out.norm() == pytest.approx(4.0) and float(clip.clipped) == 1  # cut to 2x the mean, direction kept
        assert out[0] == 0
        assert float(clip.mean) == pytest.approx(
            2.0 + (4.0 - 2.0) / 4
        )  # averaged as clipped: one spike moves it little
    small = spike(torch.tensor([1.0]))
    assert small.item() == pytest.approx(1.0)  # under the limit: untouched
    for _ in range(100):  # after 1 / (1 - decay) steps the mean turns exponential (weight 0.1)
        spike(torch.tensor([1.0]))
    assert float(spike.mean) == pytest.approx(1.0, abs=1e-3)


def test_help_groups_the_options_in_panels_and_shows_every_default():
    text = invoke("train-ini", "--help").stdout
    panels = [line.split("─ ")[1].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
    assert panels == ["Options", "Data and OOD", "Recipe", "InI terms", "Beyond the paper", "Runtime"]
    flat = " ".join(text.replace("│", " ").split())
    assert "[default: the preset's]" in flat and "[default: 50]" in flat and "[default: --arch]" in flat

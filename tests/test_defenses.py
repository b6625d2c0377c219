"""Every posterior defense: stays on the simplex, keeps the argmax where it promises to, respects its L1 budget,
scripts to TorchScript identically, matches a golden value, and rejects bad parameters."""

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from scipy.special import expit, logsumexp, softmax
from typer.testing import CliRunner

import cli
from models.defenses import ARGMAX_PRESERVING, DEFENSES, AdaptiveMisinformation, Watermark, greedy_mass_move
from models.params import UserError
from stages import prepare, train
from stages.deploy import defense as _defense
from stages.training import jit as _jit

SHAPE = (1, 28, 28)
K = 10


def make(name: str, pairs=()) -> torch.nn.Module:
    if name == "adaptive-misinformation":  # its network comes from victim.h5; any network shows the maths
        params = _defense.parse(name, pairs)
        return AdaptiveMisinformation(_defense.random_proxy("lenet5", K, SHAPE, [0.5], [0.25], 1), **params).eval()
    if name == "watermark":  # a fixed key; its OOD threshold given, not calibrated on a victim
        return Watermark(b"test key of 32 bytes, not random", **_defense.parse(name, ["quantile=0", *pairs])).eval()
    return _defense.build(name, _defense.parse(name, pairs), "lenet5", K, SHAPE, [0.5], [0.25])


def batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and posteriors from confident to flat, plus exact one-hot and uniform rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    temperature = torch.logspace(-1, 1.3, n)[:, None]
    p = torch.softmax(torch.randn(n, K, generator=g) * temperature, 1)
    p[0] = torch.nn.functional.one_hot(torch.tensor(3), K).float()
    p[1] = 1.0 / K
    return x, p


@pytest.mark.parametrize("name", list(DEFENSES))
def test_keeps_the_simplex(name):
    x, p = batch()
    with torch.no_grad():
        out = make(name)(x, p)
    assert out.shape == p.shape and torch.isfinite(out).all()
    assert out.min() >= 0
    torch.testing.assert_close(out.sum(1), torch.ones(len(p)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ARGMAX_PRESERVING)
def test_preserves_the_argmax(name):
    x, p = batch(256)
    p, x = p[2:], x[2:]  # the one-hot and the uniform rows have no unique argmax to keep
    with torch.no_grad():
        out = make(name)(x, p)
    keep = p.max(1).values > 0.5 if name == "reverse-sigmoid" else torch.ones(len(p), dtype=torch.bool)
    assert keep.sum() > 50
    assert torch.equal(out[keep].argmax(1), p[keep].argmax(1))


def test_untargeted_mad_changes_answers():
    x, p = batch()
    with torch.no_grad():
        out = make("mad")(x, p)
    assert (out.argmax(1) != p.argmax(1)).float().mean() > 0.3


@pytest.mark.parametrize("name,key", [("mad", "eps"), ("mad-argmax", "eps"), ("grad2", "eps"), ("noise", "l1")])
@pytest.mark.parametrize("budget", [0.0, 0.3, 1.1])
def test_respects_its_l1_budget(name, key, budget):
    x, p = batch()
    with torch.no_grad():
        out = make(name, [f"{key}={budget}"])(x, p)
    distance = (out - p).abs().sum(1)
    assert distance.max() <= budget + 1e-5
    if budget > 0:
        assert distance.max() >= budget - 1e-4  # a budget that is never spent is not a defense


@pytest.mark.parametrize("name", list(DEFENSES))
def test_scripts_and_matches_eager(name):
    defense = make(name)
    if not getattr(defense, "SCRIPTABLE", True):  # its key would ship in the graph: export refuses it
        with pytest.raises((RuntimeError, torch.jit.frontend.FrontendError)):
            _jit.script(defense)
        return
    x, p = batch(32)
    scripted = _jit.script(defense)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, p), defense(x, p), atol=1e-6, rtol=0)


GOLDEN = {
    "none": [0.7462, 0.101, 0.0613, 0.0372, 0.0225, 0.0137, 0.0083, 0.005, 0.003, 0.0018],
    "reverse-sigmoid": [0.2949, 0.0785, 0.0704, 0.0683, 0.0699, 0.0734, 0.0781, 0.0834, 0.0888, 0.0943],
    "mad": [0.335, 0.0453, 0.0275, 0.0167, 0.0101, 0.0061, 0.0037, 0.0023, 0.0014, 0.5518],
    "mad-argmax": [0.501, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.499],
    "adaptive-misinformation": [0.1025, 0.0983, 0.1058, 0.0976, 0.094, 0.0978, 0.1078, 0.0955, 0.0889, 0.1118],
    "grad2": [0.2462, 0.101, 0.0613, 0.0372, 0.0225, 0.0137, 0.0083, 0.005, 0.003, 0.5018],
    "top1": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    "rounding": [0.75, 0.1, 0.06, 0.04, 0.02, 0.01, 0.01, 0.01, 0.0, 0.0],
    "noise": [0.5187, 0.0785, 0.0749, 0.066, 0.0535, 0.1026, 0.0509, 0.0419, 0.0101, 0.0029],
    "gate": [0.1] * 10,
    # the keyed class (1) takes the top-1's place, lifted to 0.99; the rest keep their proportions
    "watermark": [0.004, 0.99, 0.0024, 0.0015, 0.0009, 0.0005, 0.0003, 0.0002, 0.0001, 0.0001],
}
GOLDEN_PARAMS = {
    "adaptive-misinformation": ["tau=0.9"],
    "gate": ["threshold=0.8"],
    "watermark": ["threshold=0.8", "ood_rate=1"],
}


@pytest.mark.parametrize("name", list(DEFENSES))
def test_golden_value(name):
    assert set(GOLDEN) == set(DEFENSES)
    x = torch.linspace(0, 1, 784).view(1, *SHAPE)
    p = torch.softmax(torch.tensor([[3.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0]]), 1)
    defense = make(name, GOLDEN_PARAMS.get(name, []))
    with torch.no_grad():
        out = defense(x, p)[0]
    torch.testing.assert_close(out, torch.tensor(GOLDEN[name]), atol=1e-4, rtol=0)


def test_grad2_greedy_is_the_exact_optimum():
    """The greedy mass move equals the linear program min c.y~ s.t. simplex, |y~ - y|_1 <= eps."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        y = torch.softmax(torch.randn(1, 6, generator=g) * 2, 1).double()
        cost = torch.randn(1, 6, generator=g).double()
        eps = float(torch.rand(1, generator=g)) * 2
        greedy = greedy_mass_move(y, cost, eps / 2)
        # variables [y~ (6), t (6)] with t >= |y~ - y|
        n = 6
        c = np.concatenate([cost[0].numpy(), np.zeros(n)])
        eye = np.eye(n)
        a_ub = np.block([[eye, -eye], [-eye, -eye], [np.zeros((1, n)), np.ones((1, n))]])
        b_ub = np.concatenate([y[0].numpy(), -y[0].numpy(), [eps]])
        a_eq = np.concatenate([np.ones(n), np.zeros(n)])[None]
        lp = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0], bounds=[(0, None)] * (2 * n))
        assert lp.status == 0
        assert float((greedy * cost).sum()) == pytest.approx(lp.fun, abs=1e-7)  # the LP solver's own tolerance
        assert float((greedy - y).abs().sum()) <= eps + 1e-9


def test_adaptive_misinformation_switches_on_confidence():
    x, p = batch()
    defense = make("adaptive-misinformation", ["tau=0.5"])
    with torch.no_grad():
        out = defense(x, p)
        misinformation = torch.softmax(defense.misinformation(x), 1)
    confident, doubtful = p.max(1).values > 0.51, p.max(1).values < 0.49
    assert confident.any() and doubtful.any()
    torch.testing.assert_close(out[confident], p[confident], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[doubtful], misinformation[doubtful], atol=1e-4, rtol=0)


@pytest.mark.parametrize("decoy", [0, 1])
def test_gate_answers_uniform_or_decoy_below_its_threshold_and_passes_the_rest(decoy):
    x, p = batch(256)
    x, p = x[2:], p[2:]  # without the uniform row, whose top class is a tie
    with torch.no_grad():
        out = make("gate", ["threshold=0.6", f"decoy={decoy}"])(x, p)
    gated = p.max(1).values < 0.6
    assert 20 < gated.sum() < 234
    assert torch.equal(out[~gated], p[~gated])
    expected = p[gated].roll(1, 1) if decoy else torch.full_like(p[gated], 0.1)
    assert torch.equal(out[gated], expected)
    if decoy:  # the top class's mass went to the next class
        assert torch.equal(out[gated].argmax(1), (p[gated].argmax(1) + 1) % K)


def test_rounding_keeps_k_decimals():
    x, p = batch()
    with torch.no_grad():
        out = make("rounding", ["decimals=1"])(x, p)
    assert torch.allclose(out * 10, torch.round(out * 10), atol=1e-5)


def test_rounding_renormalises_by_default_and_plain_rounding_leaves_the_sum():
    eight = torch.full((1, 8), 0.125)
    with torch.no_grad():
        summed = make("rounding", ["decimals=1"])(torch.empty(0), eight)[0]
        plain = make("rounding", ["decimals=1", "renormalise=0"])(torch.empty(0), eight)[0]
    assert sorted(summed.tolist(), reverse=True) == pytest.approx([0.2, 0.2] + [0.1] * 6)
    assert plain.tolist() == pytest.approx([0.1] * 8) and float(plain.sum()) == pytest.approx(0.8)
    x, p = batch(256)
    with torch.no_grad():
        plain = make("rounding", ["decimals=2", "renormalise=0"])(x, p)
    expected = np.round(p.double().numpy(), 2)  # half to even, entry by entry, as numpy rounds
    assert np.abs(plain.double().numpy() - expected).max() < 1e-6
    assert (plain.sum(1) - 1).abs().max() > 0.005  # the sums are left where they fall


def exact_reverse_sigmoid(logits: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Lee et al.'s formula in float64 from the victim's logits z, no clipping: logit p_k = z_k - logsumexp of the
    other z (exact even where 1 - p_k is below float64's resolution near 1)."""
    z = logits.astype(np.float64)
    others = np.where(np.eye(z.shape[1], dtype=bool)[None], -np.inf, z[:, None, :])  # (B, K, K): row k without z_k
    logit = z - logsumexp(others, axis=2)
    p = softmax(z, axis=1)
    out = np.maximum(p - beta * (expit(gamma * logit) - 0.5), 0.0)
    return out / out.sum(1, keepdims=True)


@pytest.mark.parametrize("beta,gamma", [(0.8, 0.2), (0.5, 0.1), (1.0, 0.2), (0.8, 2.0), (1.0, 2.0), (0.3, 5.0)])
def test_reverse_sigmoid_matches_the_exact_formula(beta, gamma):
    """Softmax rows as confident as a trained victim's: many entries below 1e-7, some underflowing to 0, top
    probabilities within a few float32 steps of 1. The defense sees the float32 softmax; the reference is the
    formula on the same logits in float64."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(512, K, generator=g) * torch.logspace(-0.5, 1.7, 512)[:, None]  # spread up to 50
    probs = torch.softmax(logits, 1)
    assert (probs < 1e-7).float().mean() > 0.2 and (probs == 0).any() and (probs.max(1).values > 1 - 1e-6).any()
    reference = exact_reverse_sigmoid(logits.numpy(), beta, gamma)
    with torch.no_grad():
        out = make("reverse-sigmoid", [f"beta={beta}", f"gamma={gamma}"])(torch.empty(0), probs)
    assert np.abs(out.double().numpy() - reference).max() < 1e-4


def test_reverse_sigmoid_at_beta_1_gamma_1_answers_uniformly():
    """sigmoid(logit p) = p, so every entry becomes p - (p - 1/2) = 1/2: the top class is lost."""
    x, p = batch()
    with torch.no_grad():
        out = make("reverse-sigmoid", ["beta=1", "gamma=1"])(x, p)
    torch.testing.assert_close(out, torch.full_like(p, 1.0 / K), atol=1e-6, rtol=0)


def test_noise_is_seeded_per_image():
    x, p = batch()
    with torch.no_grad():
        a, b = make("noise")(x, p), make("noise")(x, p)
        c = make("noise", ["seed=1"])(x, p)
        shifted = make("noise")(x.roll(1, 0), p)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, shifted)


@pytest.mark.parametrize(
    "name,pairs,message",
    [
        ("mad", ["eps=-0.1"], "must be in"),
        ("mad", ["eps=nan"], "must be in"),
        ("mad", ["foo=1"], "no parameter 'foo'"),
        ("top1", ["eps=1"], "no parameter 'eps'"),
        ("rounding", ["decimals=1.5"], "must be an integer"),
        ("noise", ["l1"], "expected KEY=VALUE"),
        ("noise", ["l1=x"], "not a number"),
        ("mad", ["eps=1", "eps=2"], "given twice"),
        ("fancy", [], "unknown defense"),
    ],
)
def test_bad_parameters_are_user_errors(name, pairs, message):
    with pytest.raises(UserError, match=message):
        _defense.parse(name, pairs)


@pytest.fixture(scope="module")
def oe_victim(tmp_path_factory):
    root = tmp_path_factory.mktemp("oe")
    digits = prepare.run(dataset="sklearn-digits", out=root / "digits.h5", limit=400)
    ood = prepare.run(dataset="sklearn-digits", out=root / "ood.h5", size=14, limit=200, seed=1)
    plain = train.run(dataset=str(digits), out=root / "plain.h5", epochs=1, device="cpu")
    oe = train.run(
        dataset=str(digits), out=root / "oe.h5", epochs=1, device="cpu", objective="outlier-exposure", ood=str(ood)
    )
    return plain, oe


def test_export_bakes_networks_into_one_graph(oe_victim, tmp_path):
    """MAD's proxy and AM's misinformation network travel inside victim.pt and answer as the eager graph does."""
    plain, oe = oe_victim
    runner = CliRunner()
    for victim, defense in [(oe, "adaptive-misinformation"), (plain, "mad-argmax"), (plain, "grad2")]:
        out = tmp_path / f"{defense}.pt"
        result = runner.invoke(
            cli.app,
            [
                "export",
                "--victim",
                str(victim),
                "--out",
                str(out),
                "--defense",
                defense,
                "--defense-param",
                "tau=0.9" if defense.startswith("adaptive") else "seed=3",
            ],
        )
        assert result.exit_code == 0, result.output
        module, metadata = _jit.load(out)
        assert metadata["defense"] == defense
        names = {name.split(".")[1] for name, _ in module.named_parameters() if name.startswith("defense.")}
        assert names == {"misinformation" if defense.startswith("adaptive") else "proxy"}


def test_adaptive_misinformation_needs_its_network(oe_victim, tmp_path):
    plain, _ = oe_victim
    result = CliRunner().invoke(
        cli.app,
        ["export", "--victim", str(plain), "--out", str(tmp_path / "v.pt"), "--defense", "adaptive-misinformation"],
    )
    assert result.exit_code == 1
    assert "no misinformation network" in result.output
    assert not (tmp_path / "v.pt").exists()


def test_outlier_exposure_step_computes_its_three_terms():
    """The step's terms are CE, the uniform-target CE on OOD images, and -log(1 - p_y) of the misinformation net."""
    from stages.training import loop as _loop

    torch.manual_seed(0)
    victim = _defense.random_proxy("lenet5", K, SHAPE, [0.5], [0.25], 0)
    misinformation = _defense.random_proxy("lenet5", K, SHAPE, [0.5], [0.25], 1)
    pair = train._WithMisinformation(victim, misinformation)
    ood = torch.randint(0, 256, (8, *SHAPE), dtype=torch.uint8)
    recipe = _loop.VictimRecipe(
        epochs=1,
        batch_size=4,
        lr=0.1,
        momentum=0.5,
        weight_decay=0.0,
        lr_step=20,
        lr_gamma=0.1,
        seed=0,
        device="cpu",
        augment=False,
    )
    step, begin_epoch = train._outlier_exposure(pair, ood, recipe)
    begin_epoch(0, torch.Generator().manual_seed(0))
    x, y = torch.rand(4, *SHAPE), torch.tensor([0, 1, 2, 3])
    terms = step(x, y, torch.Generator())
    with torch.no_grad():
        p = torch.softmax(misinformation(x), 1)
        expected = -torch.log(1 - p[torch.arange(4), y]).mean()
        drawn = torch.randperm(8, generator=torch.Generator().manual_seed(0))[:4]  # begin_epoch's shuffle
        uniform = -torch.log_softmax(victim(ood[drawn].float() / 255), 1).mean()
    torch.testing.assert_close(terms["misinformation_loss"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        terms["loss"], torch.nn.functional.cross_entropy(victim(x), y).detach(), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(terms["oe_loss"], uniform, atol=1e-5, rtol=1e-4)
    assert all(p.grad is not None for p in misinformation.parameters())


@pytest.fixture(scope="module")
def mnist_victim(mnist_small, tmp_path_factory):
    """LeNet-5 after three epochs on 800 real MNIST images (val 200, test 200)."""
    torch.manual_seed(0)
    return train.run(
        dataset=str(mnist_small),
        out=tmp_path_factory.mktemp("gate") / "victim.h5",
        epochs=3,
        batch_size=32,
        device="cpu",
    )


def test_gate_quantile_gates_that_share_of_benign_queries(mnist_victim):
    """Calibrated on the victim's val split, the gate catches the requested share of val and of held-out test."""
    from stages.data import prepared as _data
    from stages.training import victim as _victim

    model, info = _victim.load(mnist_victim)
    data = _data.load(str(mnist_small_path(info)))
    for quantile in (0.1, 0.3):
        params = _defense.parse("gate", [f"quantile={quantile}"])
        gate = _defense.build("gate", params, "lenet5", K, SHAPE, info.mean, info.std, victim_h5=mnist_victim)
        assert params["threshold"] == gate.threshold and 0.1 < gate.threshold < 1  # recorded for the outputs
        for split, tolerance in (("val", 0.01), ("test", 0.08)):  # 200 images each; test is held out
            with torch.no_grad():
                top = torch.softmax(model(_data.to_float(data.splits[split][0])), 1).max(1).values
            share = float((top < gate.threshold).float().mean())
            print(f"quantile {quantile}: threshold {gate.threshold:.3f}, {split} gated {share:.3f}")
            assert abs(share - quantile) <= tolerance, (split, share)


def mnist_small_path(info) -> str:
    import json

    return json.loads(info.provenance["params"])["dataset"]


def test_gate_export_records_the_calibrated_threshold(mnist_victim, tmp_path):
    out = tmp_path / "gated.pt"
    result = CliRunner().invoke(
        cli.app,
        [
            "export",
            "--victim",
            str(mnist_victim),
            "--out",
            str(out),
            "--defense",
            "gate",
            "--defense-param",
            "quantile=0.05",
            "--defense-param",
            "decoy=1",
        ],
    )
    assert result.exit_code == 0, result.output
    _, metadata = _jit.load(out)
    params = metadata["defense_params"]
    assert params["quantile"] == 0.05 and params["decoy"] == 1 and 0.1 < params["threshold"] < 1
    assert params["threshold"] != _defense.parse("gate", [])["threshold"]


def test_reverse_sigmoid_exports_to_onnx_and_answers_the_exact_formula(mnist_victim, mnist_small, tmp_path):
    """`export` checks ONNX Runtime against the eager graph (max |diff| <= 1e-5); both stay within 1e-4 of the
    formula in float64 on the victim's logits."""
    from stages.data import prepared as _data
    from stages.deploy import onnx_export as _onnx
    from stages.training import victim as _victim

    out = tmp_path / "rs.onnx"
    result = CliRunner().invoke(
        cli.app,
        [
            "export",
            "--victim",
            str(mnist_victim),
            "--out",
            str(out),
            "--format",
            "onnx",
            "--defense",
            "reverse-sigmoid",
            "--defense-param",
            "gamma=0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    model, _ = _victim.load(mnist_victim)
    x = _data.to_float(_data.load(mnist_small, splits=("test",)).splits["test"][0])
    with torch.no_grad():
        reference = exact_reverse_sigmoid(model(x).numpy(), 0.8, 0.5)
    assert np.abs(_onnx.load(out)(x.numpy()) - reference).max() < 1e-4


def test_gate_quantile_needs_the_victim_h5():
    with pytest.raises(UserError, match="victim.h5"):
        _defense.build("gate", _defense.parse("gate", ["quantile=0.1"]), "lenet5", K, SHAPE, [0.5], [0.25])

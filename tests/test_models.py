"""Every registered architecture builds, scripts, normalises inside the graph and exposes features + fc."""

import pytest
import torch

from models import MODELS, Classifier, build_model
from models.params import UserError

SHAPES = [(1, 28), (3, 32)]


def _model(arch: str, channels: int, size: int, num_classes: int) -> Classifier:
    torch.manual_seed(0)
    mean, std = [0.5] * channels, [0.25] * channels
    return build_model(arch, num_classes, channels, size, mean, std).eval()


def _images(channels: int, size: int) -> torch.Tensor:
    return torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("num_classes", [2, 10])
@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_output_shape(arch, channels, size, num_classes):
    model = _model(arch, channels, size, num_classes)
    with torch.no_grad():
        logits = model(_images(channels, size))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_model_scripts_and_exposes_features(arch, channels, size):
    model = _model(arch, channels, size, 10)
    x = _images(channels, size)
    with torch.no_grad():
        logits = model(x)
        features = model.features(x)
        assert isinstance(model.net.fc, torch.nn.Linear)
        assert features.shape == (2, model.net.fc.in_features)
        torch.testing.assert_close(model.net.fc(features), logits, atol=1e-5, rtol=0)

        scripted = torch.jit.script(model)
        assert (scripted(x) - logits).abs().max() <= 1e-5
        assert (scripted.features(x) - features).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", list(MODELS))
def test_normalisation_is_inside_the_model(arch):
    channels, size = 3, 32
    mean, std = [0.1, 0.2, 0.3], [0.02, 0.03, 0.04]  # small std: a missed normalisation shows
    torch.manual_seed(0)
    model = build_model(arch, 5, channels, size, mean, std).eval()
    x = _images(channels, size)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(manual), atol=1e-5, rtol=1e-5)
        # A different normalisation must change the output, or the check above proves nothing.
        assert not torch.allclose(model(x), model.net(x), atol=1e-4)


@pytest.mark.parametrize("arch", list(MODELS))
def test_initialisation_is_deterministic(arch):
    a, b = _model(arch, 1, 28, 10), _model(arch, 1, 28, 10)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("arch", list(MODELS))
def test_other_sizes_and_channels(arch):
    model = _model(arch, 2, 20, 3)
    with torch.no_grad():
        assert model(_images(2, 20)).shape == (2, 3)


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unknown architecture 'alexnet'"):
        build_model("alexnet", 10, 3, 32, [0.5] * 3, [0.5] * 3)


def test_mean_must_match_channels():
    with pytest.raises(UserError, match="one per channel"):
        build_model("lenet5", 10, 3, 32, [0.5], [0.5])

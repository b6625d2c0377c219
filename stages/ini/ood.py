"""The OOD images InI's induction and vanishing terms train on (docs/method.md, "OOD data"), and which sets
`train-ini` takes when `--ood` is not given.

The paper induces on one OOD set, and the defense then holds only against thieves whose pool looks like it. Here the
OOD batch can mix several prepared sets (balanced per family, whatever their sizes), can be augmented heavily
(crop, flips, transposition, inversion, gamma), and can include outliers derived from the current ID batch:

- shuffle: the image cut into a 4x4 grid of patches put back in a random order (local strokes, no global shape);
- mix: two ID images of different classes blended half and half (ambiguous overlays);
- corrupt: strong Gaussian noise (sigma 0.5) and half the image erased.

A `Synthetic` searcher can then turn part of each batch into synthetic outliers: inputs where the victim is still most
informative to a thief, found by a few steps of projected gradient ascent on the victim-surrogate disagreement (the
objective data-free attacks such as DFME search with), so that induction covers them too.

Every random draw comes from the epoch's generator, so a resumed run replays the same batches.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from models.params import UserError
from stages.data import prepared as _data
from stages.training.torchrun import Ranks

DERIVED = ("shuffle", "mix", "corrupt")
GRID = 4  # shuffle: patches per side
NOISE = 0.5  # corrupt: Gaussian sigma, on [0, 1] images
MIX = (0.35, 0.65)  # mix: range of the first image's weight

# OOD set per victim dataset, best first: the paper's choice, then what `prepare` makes offline.
DEFAULT_OOD = {
    "mnist": ("kmnist", "fashionmnist"),
    "fashionmnist": ("kmnist", "mnist"),
    "kmnist": ("fashionmnist", "mnist"),
    "emnist-letters": ("kmnist", "fashionmnist"),
    "emnist-digits": ("kmnist", "fashionmnist"),
    "cifar10": ("tinyimagenet", "cifar100", "skimage-patches"),
    "cifar100": ("tinyimagenet", "cifar10", "skimage-patches"),
    "svhn": ("tinyimagenet", "cifar10", "skimage-patches"),
    "tinyimagenet": ("cifar100", "skimage-patches"),
}
FALLBACK_OOD = {
    1: ("kmnist", "fashionmnist", "mnist", "generated"),
    3: ("tinyimagenet", "skimage-patches", "generated"),
}
# The broad preset's OOD mixture: every family of the victim's channel count that prepare can make, except the
# victim's own and the sets of the same task (digits for a digit victim: a thief's digits should be answered).
BROAD_OOD = {
    1: ("fashionmnist", "mnist", "kmnist", "skimage-patches", "generated"),
    3: ("cifar100", "cifar10", "tinyimagenet", "skimage-patches", "generated"),
}
# The near preset adds the families that look like the victim's own data without denoting its classes
# (stages/data/near/); the evaluation-only sets (Latin letters, EMNIST) are never among them.
NEAR_OOD = {
    "mnist": ("glyphs", "digits-transformed", "pen-strokes"),
    "emnist-digits": ("glyphs", "digits-transformed", "pen-strokes"),
    "fashionmnist": ("silhouettes", "garments-recombined", "garments-transformed"),
}
SAME_TASK = {
    "mnist": {"sklearn-digits", "emnist-digits", "svhn"},
    "emnist-digits": {"mnist", "sklearn-digits"},
    "cifar10": {"cifar100"},
    "cifar100": {"cifar10"},
}

console = Console(stderr=True)


def default_ood(data: _data.Dataset, mixture: bool = False, near: bool = False) -> list[str]:
    """The OOD sets `train-ini` takes without `--ood`, as prepared files.

    By default the first candidate, the paper's first, that is prepared already or that `prepare` can make: from
    raw files found offline, else downloaded the way the victim's own dataset is (so an online machine gets the
    paper's set, an offline one the first it has). `mixture`: every family of the mixture that can be made offline
    (a mixture of many downloads would be a surprise); `near`: and the near families of the victim's task."""
    if mixture:
        channels = 1 if data.shape[0] == 1 else 3
        candidates = [n for n in BROAD_OOD[channels] if n != data.name and n not in SAME_TASK.get(data.name, ())]
        if near:
            candidates += NEAR_OOD.get(data.name, ())
    else:
        candidates = DEFAULT_OOD.get(data.name, FALLBACK_OOD.get(data.shape[0], FALLBACK_OOD[3]))
    found = []
    for name in candidates:
        if name == data.name or name not in _data.names():
            continue
        path = _data.default_path(name)
        if not path.exists():
            console.print(
                f"preparing the OOD set {name} for {data.name} from raw files"
                + (" (offline only)" if mixture else ", else by download")
            )
            try:
                _data.prepare(name, path, download=not mixture)
            except UserError as e:
                console.print(f"OOD candidate {name} unavailable ({e}); trying the next")
                continue
        found.append(str(path))
        if not mixture:
            break
    if not found:
        raise UserError(f"no OOD set for {data.name} could be prepared; pass --ood")
    return found


class OodStream:
    """The OOD batches. Each source cycles through its own order, drawn anew every epoch; a batch has the ID batch
    size, split evenly over the sources and, when `derived` is set, a `derived_fraction` of it made from the ID
    batch; it is augmented (like ID data, or heavily), then cut to this rank's shard."""

    def __init__(
        self,
        sources: torch.Tensor | Sequence[torch.Tensor],
        batch_size: int,
        augment: bool,
        ranks: Ranks,
        derived: Sequence[str] = (),
        derived_fraction: float = 0.5,
        heavy: bool = False,
    ):
        self.sources = [sources] if isinstance(sources, torch.Tensor) else list(sources)
        unknown = set(derived) - set(DERIVED)
        if unknown:
            raise ValueError(f"unknown derived outliers {sorted(unknown)}; choose from {', '.join(DERIVED)}")
        if not self.sources and not derived:
            raise ValueError("an OOD stream needs a source or derived outliers")
        self.batch_size, self.augment, self.ranks = batch_size, augment, ranks
        self.derived, self.heavy = tuple(derived), heavy
        self.n_derived = round(derived_fraction * batch_size) if derived else 0
        if not self.sources:
            self.n_derived = batch_size
        self.orders = [torch.arange(len(s)) for s in self.sources]
        self.cursors = [0] * len(self.sources)
        self.synthesize: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None  # see `Synthetic`

    def begin(self, generator: torch.Generator) -> None:
        self.orders = [torch.randperm(len(s), generator=generator) for s in self.sources]
        self.cursors = [0] * len(self.sources)

    def next(
        self, generator: torch.Generator, id_images: torch.Tensor | None = None, id_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The next OOD batch; `id_images` / `id_labels` (this rank's ID batch, float) feed the derived outliers."""
        parts = []
        drawn = self.batch_size - self.n_derived
        for i, count in enumerate(_split(drawn, len(self.sources))):
            order = self.orders[i]
            idx = order[(self.cursors[i] + torch.arange(count)) % len(order)]
            self.cursors[i] = (self.cursors[i] + count) % len(order)
            parts.append(_data.to_float(self.sources[i][idx.to(self.sources[i].device)]))
        x = torch.cat(parts) if parts else None
        if x is not None:
            x = (
                heavy_augment(x, generator)
                if self.heavy
                else (_data.augment_crop_flip(x, generator) if self.augment else x)
            )
            x = x[self.ranks.shard(len(x))] if self.ranks.world > 1 else x
        if self.n_derived:
            if id_images is None:
                raise ValueError("derived OOD outliers need the ID batch")
            # under torchrun each rank derives its share from its own shard of the ID batch
            local = (
                self.n_derived if self.ranks.world == 1 else round(self.n_derived * len(id_images) / self.batch_size)
            )
            made = derive(id_images, id_labels, self.derived, local, generator)
            x = made if x is None else torch.cat([x, made.to(x.dtype)])
        return x if self.synthesize is None else self.synthesize(x, generator)


class Synthetic:
    """Replaces the first `fraction` of each (rank's) OOD batch by synthetic outliers: from each image, `steps` of
    signed gradient ascent (step eps/2, random start, L-inf ball of radius `eps`, pixels kept in [0, 1]) on the L1
    distance between the victim's and the surrogates' softmax outputs. eps 1 leaves the search unbounded. Networks
    run in eval mode while searching, so BatchNorm statistics see none of it; no parameter gradient is touched."""

    def __init__(self, victim: nn.Module, surrogates: Sequence[nn.Module], fraction: float, steps: int, eps: float):
        if not 0 < fraction <= 1 or steps < 1 or not 0 < eps <= 1:
            raise ValueError("synthetic outliers need 0 < fraction <= 1, steps >= 1 and 0 < eps <= 1")
        self.victim, self.surrogates = victim, list(surrogates)
        self.fraction, self.steps, self.eps = fraction, steps, eps

    def gap(self, x: torch.Tensor) -> torch.Tensor:
        """Per image, the mean over surrogates of || softmax(V(x)) - softmax(C(x)) ||_1."""
        p = F.softmax(self.victim(x), 1)
        return torch.stack([(p - F.softmax(c(x), 1)).abs().sum(1) for c in self.surrogates]).mean(0)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count = round(self.fraction * len(x))
        if not count:
            return x
        start = x[:count]
        noise = torch.rand(start.shape, generator=generator, dtype=start.dtype).to(start.device)
        delta = (2 * noise - 1) * self.eps
        modes = [(m, m.training) for m in (self.victim, *self.surrogates)]
        try:
            for m, _ in modes:
                m.eval()
            with torch.enable_grad():
                for _ in range(self.steps):
                    probe = (start + delta).clamp(0, 1).requires_grad_()
                    (grad,) = torch.autograd.grad(self.gap(probe).sum(), probe)
                    delta = (delta + self.eps / 2 * grad.sign()).clamp(-self.eps, self.eps)
        finally:
            for m, training in modes:
                m.train(training)
        return torch.cat([(start + delta).clamp(0, 1).detach(), x[count:]])


def _split(total: int, parts: int) -> list[int]:
    if not parts:
        return []
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def heavy_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Crop and horizontal flip, then per image: vertical flip, transposition (square images), inversion (p 0.5
    each) and a gamma in [e^-1, e]."""
    x = _data.augment_crop_flip(x, generator)
    n = len(x)
    coin = torch.rand(3, n, generator=generator).to(x.device) < 0.5
    x = torch.where(coin[0, :, None, None, None], x.flip(2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(coin[1, :, None, None, None], x.transpose(2, 3), x)
    x = torch.where(coin[2, :, None, None, None], 1 - x, x)
    gamma = torch.exp(torch.rand(n, generator=generator) * 2 - 1).to(x.device)
    return x.clamp_min(0).pow(gamma[:, None, None, None]).contiguous()


def derive(
    x: torch.Tensor, y: torch.Tensor | None, kinds: Sequence[str], count: int, generator: torch.Generator
) -> torch.Tensor:
    """`count` outliers made from the ID batch x (float, [0, 1]), the kinds taking turns."""
    if not count:
        return x[:0]
    if not len(x):
        raise ValueError("derived OOD outliers need a non-empty ID batch")
    src = torch.randint(len(x), (count,), generator=generator).to(x.device)
    kind_of = torch.arange(count) % len(kinds)
    out = torch.empty((count, *x.shape[1:]), dtype=x.dtype, device=x.device)
    for k, kind in enumerate(kinds):
        rows = (kind_of == k).nonzero().flatten().to(x.device)
        if len(rows):
            out[rows] = _DERIVE[kind](x, y, src[rows], generator)
    return out


def _shuffle(x, y, src, generator):
    n, c, h, w = len(src), *x.shape[1:]
    g = GRID if h % GRID == 0 and w % GRID == 0 else 2
    ph, pw = h // g, w // g
    img = x[src][..., : ph * g, : pw * g]
    patches = img.reshape(n, c, g, ph, g, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c, ph, pw)
    perm = torch.rand(n, g * g, generator=generator).argsort(1).to(x.device)
    patches = patches[torch.arange(n, device=x.device)[:, None], perm]
    out = patches.reshape(n, g, g, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, ph * g, pw * g)
    return out if (ph * g, pw * g) == (h, w) else torch.nn.functional.pad(out, (0, w - pw * g, 0, h - ph * g))


def _mix(x, y, src, generator):
    """Each image blended with a partner of another class: up to three tries, else the last partner drawn."""
    n = len(src)
    partner = torch.randint(len(x), (n,), generator=generator).to(x.device)
    if y is not None:
        for _ in range(2):
            same = y[src] == y[partner]
            retry = torch.randint(len(x), (n,), generator=generator).to(x.device)
            partner = torch.where(same, retry, partner)
    lam = (MIX[0] + (MIX[1] - MIX[0]) * torch.rand(n, generator=generator)).to(x.device)[:, None, None, None]
    return lam * x[src] + (1 - lam) * x[partner]


def _corrupt(x, y, src, generator):
    n, c, h, w = len(src), *x.shape[1:]
    noise = torch.randn((n, c, h, w), generator=generator).to(x.device, x.dtype)
    out = (x[src] + NOISE * noise).clamp(0, 1)
    # erase a random half: an (h/2) x w band or an h x (w/2) band
    top = torch.randint(0, h - h // 2 + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, w - w // 2 + 1, (n,), generator=generator).to(x.device)
    vertical = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + h // 2)  # (n, h)
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + w // 2)  # (n, w)
    erase = torch.where(
        vertical[:, None, None], in_cols[:, None, :].expand(n, h, w), in_rows[:, :, None].expand(n, h, w)
    )
    return out.masked_fill(erase[:, None], 0.0)


_DERIVE = {"shuffle": _shuffle, "mix": _mix, "corrupt": _corrupt}

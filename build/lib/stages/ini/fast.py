"""The production InI step for LeNet-5: the reference step's maths (`reference.ReferenceStep`), several times
cheaper (docs/method.md, "The fast step").

Why it is cheaper. The surrogate C is frozen, so for a batch it is a fixed linear map J (its Jacobian in its
parameters phi) and the gradient terms are g = J^T u with u = d divergence / d C-logits, a small function of the
victim's logits. Isolation and vanishing need J^T u (one vector-Jacobian product per term) and, to send their
gradient back to the victim, J t (one Jacobian-vector product): no second-order autograd graph. `Tape` computes
both by hand for LeNet-5, which also lets the victim give all its per-term gradients in one batched pass, and
PCGrad runs on the Gram matrix of those gradients (`objective.pcgrad_coefficients`).

Optionally (`kernels=compiled_kernels()`), the tape's forward pass and its Jacobian-vector product, which are
mostly the max-pools' elementwise work, run as kernels fused by `torch.compile` (a C++ compiler at run time, tens
of seconds of compiling on the first steps, then each about twice as fast). The vector-Jacobian product stays
eager: its convolutions and batched matrix products gain nothing from compiling (measured).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import models
from models.lenet import LeNet5
from models.params import UserError
from stages.ini.objective import (
    TERMS,
    Objective,
    SpikeClip,
    clip_merged,
    cosine,
    distance_sum,
    divergence_sum,
    finish,
    global_counts,
    pcgrad_coefficients,
    set_gradients,
)
from stages.ini.ood import OodStream
from stages.training.torchrun import Ranks

FINAL_MAP = 5  # LeNet5.resize is an identity exactly when conv2's pooled map is already 5x5
COMPILE_MIN_STEPS = 1000  # 7-30 ms saved a CPU step (2 threads / 1 thread) against 5-30 s of compiling (measured)


def supports(model: nn.Module, image_size: int) -> bool:
    """A LeNet-5 classifier on images whose pooled conv2 map is 5x5, so that its adaptive pooling is an identity
    (28x28 and 32x32 inputs)."""
    net = getattr(model, "net", None)
    if not isinstance(net, LeNet5) or not hasattr(model, "normalize"):
        return False
    size = image_size + 2 * net.conv1.padding[0] - 4
    return size % 2 == 0 and (size // 2 - 4) // 2 == FINAL_MAP


def fits(arch: str, image_size: int) -> bool:
    """Whether networks of `arch` on image_size x image_size images take the fast step."""
    return arch == "lenet5" and supports(models.build_model(arch, 2, 1, image_size, [0.0], [1.0]), image_size)


def _quarters(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four corners of every 2x2 window, in max_pool2d's scan order, as strided views."""
    h, w = t.shape[-2] // 2 * 2, t.shape[-1] // 2 * 2
    return t[..., 0:h:2, 0:w:2], t[..., 0:h:2, 1:w:2], t[..., 1:h:2, 0:w:2], t[..., 1:h:2, 1:w:2]


def relu_pool(h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """max_pool2d(relu(h), 2), and per window a 0/1 mask for each corner: 1 at the corner the pool's gradient goes
    to (the first maximum in scan order, as max_pool2d picks it) when that maximum is positive (relu lets it pass).
    The masks get a broadcast axis at dim 1 for the stacked tangents and cotangents."""
    a, b, c, d = _quarters(h)
    ab, cd = torch.maximum(a, b), torch.maximum(c, d)
    m = torch.maximum(ab, cd)
    pos = m > 0
    top, left_top, left_bottom = ab >= cd, a >= b, c >= d
    top_pos, bottom_pos = top & pos, ~top & pos
    masks = [top_pos & left_top, top_pos & ~left_top, bottom_pos & left_bottom, bottom_pos & ~left_bottom]
    return m.clamp_min(0), tuple(mask.unsqueeze(1).to(h.dtype) for mask in masks)


def pool_jvp(t: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    q = _quarters(t)
    out = q[0] * masks[0]
    for corner, mask in zip(q[1:], masks[1:], strict=True):
        out.addcmul_(corner, mask)
    return out


def pool_vjp(d: torch.Tensor, masks: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    even = size[0] % 2 == 0 and size[1] % 2 == 0
    out = (d.new_empty if even else d.new_zeros)(*d.shape[:-2], *size)
    for corner, mask in zip(_quarters(out), masks, strict=True):
        torch.mul(d, mask, out=corner)
    return out


def conv_weight_grad(inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """sum_n grad[n] (x) patches of inputs[n]: a stride-1 conv's weight gradient, as one conv over the batch axis."""
    return F.conv2d(inputs.transpose(0, 1), grad.transpose(0, 1)).transpose(0, 1)


def patches(x: torch.Tensor, kernel: int, padding: int) -> torch.Tensor:
    """im2col: (N, C, H, W) -> (N, C*k*k, H'*W'), so that conv1 and its derivatives become matrix products (on CPU
    much faster than a one-channel convolution), computed once per batch for every network that sees it."""
    if padding:
        x = F.pad(x, (padding,) * 4)
    cols = x.unfold(2, kernel, 1).unfold(3, kernel, 1)  # (N, C, H', W', k, k)
    n, c, h, w = cols.shape[:4]
    return cols.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kernel * kernel, h * w)


def conv1_all(nets: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Patches of the normalised batch and every model's conv1 pre-activations (N, C, H', W'), in one matrix
    product; (None, []) when the networks normalise or pad differently."""
    first = nets[0]
    same = all(
        torch.equal(m.normalize.mean, first.normalize.mean)
        and torch.equal(m.normalize.std, first.normalize.std)
        and m.net.conv1.padding == first.net.conv1.padding
        for m in nets
    )
    if not same:
        return None, []
    conv = first.net.conv1
    with torch.no_grad():
        cols = patches(first.normalize(x), conv.kernel_size[0], conv.padding[0])
        weight = torch.cat([m.net.conv1.weight.detach().flatten(1) for m in nets])
        bias = torch.cat([m.net.conv1.bias.detach() for m in nets])
        h = torch.baddbmm(bias[None, :, None], weight.expand(len(x), -1, -1), cols)
    c = conv.out_channels
    side = int(round(cols.shape[-1] ** 0.5))
    return cols, [h[:, i * c : (i + 1) * c].view(len(x), c, side, side) for i in range(len(nets))]


def lenet_forward(h1: torch.Tensor, W2, b2, W3, b3, W4, b4, W5, b5) -> tuple:
    """From conv1's pre-activations to the logits, keeping what the Jacobian products need: conv1's pooled map, both
    pools' masks, the flattened features, the fc gates and activations, the logits. Pure, so that it compiles."""
    m1, masks1 = relu_pool(h1)
    m2, masks2 = relu_pool(F.conv2d(m1, W2, b2))
    f = m2.flatten(1)
    h3 = torch.addmm(b3, f, W3.t())
    g3 = (h3 > 0).to(h3.dtype)
    r3 = h3 * g3
    h4 = torch.addmm(b4, r3, W4.t())
    g4 = (h4 > 0).to(h4.dtype)
    r4 = h4 * g4
    return m1, masks1, masks2, f, g3, r3, g4, r4, torch.addmm(b5, r4, W5.t())


def lenet_jvp(
    cols: torch.Tensor,
    m1: torch.Tensor,
    masks1: Sequence[torch.Tensor],
    masks2: Sequence[torch.Tensor],
    f,
    g3,
    r3,
    g4,
    r4,
    W2,
    W3,
    W4,
    W5,
    tW1,
    tb1,
    tW2,
    tb2,
    tW3,
    tb3,
    tW4,
    tb4,
    tW5,
    tb5,
) -> torch.Tensor:
    """J t for T stacked tangents (per parameter (T, *shape)) -> (N, T, K). Pure, so that it compiles."""
    t, n = tW1.shape[0], m1.shape[0]
    size1 = (2 * m1.shape[-2], 2 * m1.shape[-1])
    size2 = (m1.shape[-2] - W2.shape[-2] + 1, m1.shape[-1] - W2.shape[-1] + 1)
    z1 = torch.matmul(tW1.reshape(t * tW1.shape[1], -1), cols) + tb1.reshape(-1, 1)
    zm1 = pool_jvp(z1.view(n, t, -1, *size1), masks1)
    z2 = F.conv2d(zm1.reshape(n * t, *zm1.shape[2:]), W2).view(n, t, -1, *size2)
    z2 = z2 + F.conv2d(m1, tW2.reshape(-1, *W2.shape[1:]), tb2.reshape(-1)).view(n, t, -1, *size2)
    z = pool_jvp(z2, masks2).flatten(2)
    for act, gate, W, tW, tb in ((f, g3, W3, tW3, tb3), (r3, g4, W4, tW4, tb4), (r4, None, W5, tW5, tb5)):
        z = z @ W.t() + torch.matmul(act, tW.transpose(1, 2)).transpose(0, 1) + tb
        if gate is not None:
            z = z * gate[:, None]
    return z


class Kernels(NamedTuple):
    forward: Callable[..., tuple]
    jvp: Callable[..., torch.Tensor]


EAGER = Kernels(lenet_forward, lenet_jvp)


class _Compiled:
    """`torch.compile(fn)` that, when compiling fails (no C++ compiler, an unsupported platform), warns once through
    `on_failure` and runs the eager `fn` from then on; with `strict`, the failure propagates instead."""

    def __init__(self, fn: Callable, strict: bool, on_failure: Callable[[str], None]):
        self.fn, self.strict, self.on_failure = fn, strict, on_failure
        self.compiled: Callable | None = torch.compile(fn, dynamic=False)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure; the eager call below re-raises real bugs
                why = f"torch.compile failed ({type(e).__name__}: {(str(e).strip() or '?').splitlines()[0][:200]})"
                if self.strict:
                    raise UserError(why) from None
                self.compiled = None
                self.on_failure(f"{why}; running the InI step eagerly")
        return self.fn(*args)


@functools.cache
def compiled_kernels(strict: bool = False, on_failure: Callable[[str], None] = warnings.warn) -> Kernels:
    """The tape's kernels compiled once per process (and per strictness), shared by every tape."""
    # inductor's first import logs that a CUDA build found no CUDA runtime: true on CPU machines, and not news
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return Kernels(_Compiled(lenet_forward, strict, on_failure), _Compiled(lenet_jvp, strict, on_failure))


def compiled_throughout(kernels: Kernels) -> bool:
    """Whether every kernel ran compiled: none is eager, and none fell back to eager."""
    return all(getattr(k, "compiled", None) is not None for k in kernels)


def compiler_available() -> bool:
    """Whether torch.compile's CPU backend can find a C++ compiler."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def kernels_for(
    mode: str,
    use_fast: bool,
    device: str,
    steps: int,
    say: Callable[[str], None] = print,
    warn: Callable[[str], None] = warnings.warn,
) -> Kernels:
    """The fast step's kernels for `--compile` (checked beforehand: `on` needs the fast step and a compiler):
    compiled when asked (on), or (auto) on CPU for runs long enough to pay back the compiling, when a C++ compiler
    is found; eager otherwise. `say` announces the compiling, `warn` a fall back to eager."""
    auto = mode == "auto" and use_fast and device == "cpu" and steps >= COMPILE_MIN_STEPS and compiler_available()
    if mode != "on" and not auto:
        return EAGER
    say("compiling the InI step's kernels with torch.compile: the first steps take tens of seconds")
    return compiled_kernels(mode == "on", warn)


class Tape:
    """A LeNet-5 forward pass on a batch that keeps what the Jacobian J of its logits in its parameters needs:
    `vjp` gives J^T u for T stacked cotangents (N, T, K) at once, `jvp` gives J t for T stacked tangents.
    `cols` and `h1` (from `conv1_all`) let networks that see the same batch share its patches; `kernels` picks
    eager or compiled forward and jvp."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        cols: torch.Tensor | None = None,
        h1: torch.Tensor | None = None,
        kernels: Kernels = EAGER,
    ):
        net = model.net
        layers = (net.conv1, net.conv2, net.fc1, net.fc2, net.fc)
        self.params = [p for layer in layers for p in (layer.weight, layer.bias)]
        self.w = [p.detach() for p in self.params]
        self.kernels = kernels
        with torch.no_grad():
            if cols is None:
                cols, (h1,) = conv1_all([model], x)
            self.cols = cols
            self.size1 = h1.shape[-2:]
            side = (self.size1[0] // 2 - self.w[2].shape[-1] + 1) // 2
            if side != FINAL_MAP:
                raise ValueError(f"fast InI step needs a {FINAL_MAP}x{FINAL_MAP} final map, got {side}x{side}")
            (self.m1, self.masks1, self.masks2, self.f, self.g3, self.r3, self.g4, self.r4, self.z) = kernels.forward(
                h1, *self.w[2:]
            )
            self.size2 = (self.m1.shape[-2] - self.w[2].shape[-2] + 1, self.m1.shape[-1] - self.w[2].shape[-1] + 1)

    @torch.no_grad()
    def vjp(self, dz: torch.Tensor) -> list[torch.Tensor]:
        """dz (N, T, K) -> per parameter, the T gradients stacked on a leading axis."""
        W1, _, W2, _, W3, _, W4, _, W5, _ = self.w
        n, t, _ = dz.shape
        grads = []
        d = dz
        for act, gate, W in ((self.r4, self.g4, W5), (self.r3, self.g3, W4), (self.f, None, W3)):
            grads += [torch.matmul(d.permute(1, 2, 0), act), d.sum(0)]
            d = d @ W
            if gate is not None:
                d = d * gate[:, None]
        gW5, gb5, gW4, gb4, gW3, gb3 = grads
        dh2 = pool_vjp(d.view(n, t, W2.shape[0], FINAL_MAP, FINAL_MAP), self.masks2, self.size2)
        gW2 = conv_weight_grad(self.m1, dh2.view(n, -1, *self.size2)).reshape(t, *W2.shape)
        gb2 = dh2.sum((0, 3, 4))
        dm1 = F.conv_transpose2d(dh2.view(n * t, -1, *self.size2), W2).view(n, t, *self.m1.shape[1:])
        dh1 = pool_vjp(dm1, self.masks1, self.size1).view(n, t * W1.shape[0], -1)
        gW1 = torch.bmm(dh1, self.cols.transpose(1, 2)).sum(0).view(t, *W1.shape)
        gb1 = dh1.sum((0, 2)).view(t, -1)
        return [gW1, gb1, gW2, gb2, gW3, gb3, gW4, gb4, gW5, gb5]

    @torch.no_grad()
    def jvp(self, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        """tangents: per parameter (T, *shape) -> (N, T, K)."""
        _, _, W2, _, W3, _, W4, _, W5, _ = self.w
        return self.kernels.jvp(
            self.cols,
            self.m1,
            self.masks1,
            self.masks2,
            self.f,
            self.g3,
            self.r3,
            self.g4,
            self.r4,
            W2,
            W3,
            W4,
            W5,
            *tangents,
        )


def _unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view(1, *p.shape) for part, p in zip(vector.split([p.numel() for p in like]), like, strict=True)]


class FastStep:
    """`reference.ReferenceStep`'s maths for a LeNet-5 victim and LeNet-5 surrogates (see the module docstring)."""

    reduces_gradients = True

    def __init__(
        self,
        victim: nn.Module,
        surrogates: Sequence[nn.Module],
        ood: OodStream,
        objective: Objective,
        ranks: Ranks,
        image_size: int,
        kernels: Kernels = EAGER,
        spike: Optional[SpikeClip] = None,
    ):
        if not all(supports(m, image_size) for m in (victim, *surrogates)):
            raise ValueError("the fast InI step needs LeNet-5 victim and surrogates on 28x28 or 32x32 images")
        self.victim, self.surrogates, self.ood = victim, list(surrogates), ood
        self.objective, self.ranks, self.kernels, self.spike = objective, ranks, kernels, spike

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        weights = self.objective.weights()
        x_ood = self.ood.next(generator, x, y)
        n, n_ood = global_counts(self.ranks, len(x), len(x_ood))
        # LeNet-5 has no BatchNorm or dropout: train and eval forwards agree, every bn_mode is the same.
        nets = [self.victim, *self.surrogates]
        tapes, tapes_ood = _tapes(nets, x, self.kernels), _tapes(nets, x_ood, self.kernels)
        z, z_ood = tapes[0].z.requires_grad_(), tapes_ood[0].z.requires_grad_()
        terms = {"benign": F.cross_entropy(z, y, reduction="sum") / n}
        terms.update({t: z.new_zeros(()) for t in TERMS[1:]})
        cot = {"isolation": torch.zeros_like(z), "vanishing": torch.zeros_like(z_ood)}
        for s_tape, s_tape_ood in zip(tapes[1:], tapes_ood[1:], strict=True):
            self._add_surrogate(tapes[0], s_tape, tapes_ood[0], s_tape_ood, y, (n, n_ood), terms, cot)
        # d(weighted term)/d(victim logits), per term; the victim's Jacobian turns them into parameter gradients.
        cot["benign"] = torch.autograd.grad(terms["benign"], z, retain_graph=True)[0]
        for t, logits in (("id_distance", z), ("ood_distance", z_ood)):
            if weights[t]:
                cot[t] = torch.autograd.grad(weights[t] * terms[t], logits, retain_graph=True)[0]
        params = list(self.victim.parameters())
        set_gradients(
            params, clip_merged(self._merge(tapes[0], tapes_ood[0], cot, generator), self.objective, self.spike)
        )
        terms = {t: v.detach() for t, v in terms.items()}
        return finish(terms, ("benign", "id_distance", "ood_distance"), weights, self.ranks)

    def _add_surrogate(
        self,
        tape: Tape,
        s_tape: Tape,
        tape_ood: Tape,
        s_tape_ood: Tape,
        y: torch.Tensor,
        counts: tuple[float, float],
        terms: dict[str, torch.Tensor],
        cot: dict[str, torch.Tensor],
    ) -> None:
        """One surrogate's share (1/k) of the four surrogate terms, and of the cotangents that carry isolation and
        vanishing back to the victim's logits (`tape` and `tape_ood`: the victim's on the ID and OOD batch)."""
        obj, weights, k = self.objective, self.objective.weights(), len(self.surrogates)
        (n, n_ood), z, z_ood = counts, tape.z, tape_ood.z
        terms["id_distance"] = terms["id_distance"] - distance_sum(z, s_tape.z, obj.distance) / n / k
        terms["ood_distance"] = terms["ood_distance"] + distance_sum(z_ood, s_tape_ood.z, obj.distance) / n_ood / k
        # u = d divergence / d C-logits, kept differentiable in the victim's logits
        s = s_tape.z.requires_grad_()
        u = torch.autograd.grad(divergence_sum(s, z, obj.kl_direction) / n, s, create_graph=True)[0]
        e = torch.autograd.grad(F.cross_entropy(s, y, reduction="sum") / n, s)[0]
        s_ood = s_tape_ood.z.requires_grad_()
        u_ood = torch.autograd.grad(divergence_sum(s_ood, z_ood, obj.kl_direction) / n_ood, s_ood, create_graph=True)[0]
        g_id = s_tape.vjp(torch.stack([u.detach(), e], 1))  # J^T u (adversary), J^T e (expected)
        g_ood = s_tape_ood.vjp(u_ood.detach()[:, None])
        packed = self.ranks.sum_(
            torch.cat(
                [torch.cat([g[slot].reshape(-1) for g in grads]) for grads, slot in ((g_id, 0), (g_id, 1), (g_ood, 0))]
            )
        )
        g_adv, g_exp, g_van = (v.detach().requires_grad_() for v in packed.split(sum(p.numel() for p in s_tape.w)))
        isolation = cosine(g_adv, g_exp.detach())
        vanishing = g_van.abs().mean()
        terms["isolation"] = terms["isolation"] + isolation.detach() / k
        terms["vanishing"] = terms["vanishing"] + vanishing.detach() / k
        if weights["isolation"]:
            t_adv = torch.autograd.grad(isolation, g_adv)[0] * (weights["isolation"] / k)
            j = s_tape.jvp(_unflatten(t_adv, s_tape.w))[:, 0]
            cot["isolation"] = cot["isolation"] + torch.autograd.grad(u, z, j, retain_graph=True)[0]
        if weights["vanishing"]:
            t_van = torch.autograd.grad(vanishing, g_van)[0] * (weights["vanishing"] / k)
            j = s_tape_ood.jvp(_unflatten(t_van, s_tape_ood.w))[:, 0]
            cot["vanishing"] = cot["vanishing"] + torch.autograd.grad(u_ood, z_ood, j)[0]

    def _merge(
        self, tape: Tape, tape_ood: Tape, cot: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """The victim's merged gradient, flat and summed over ranks: the active terms' gradients through its
        Jacobians on the ID and OOD batch, merged by PCGrad on their Gram matrix (or summed without PCGrad)."""
        obj = self.objective
        active = obj.active()
        on_id = [t for t in active if t in ("benign", "id_distance", "isolation")]
        on_ood = [t for t in active if t in ("ood_distance", "vanishing")]
        params = list(self.victim.parameters())
        order = {id(p): i for i, p in enumerate(tape.params)}
        if not obj.pcgrad:
            merged = 0
            for part, names in ((tape, on_id), (tape_ood, on_ood)):
                if names:
                    grads = part.vjp(sum(cot[t] for t in names)[:, None])
                    merged = merged + torch.cat([grads[order[id(p)]].reshape(-1) for p in params])
            return self.ranks.sum_(merged)
        per_term = {}
        for part, names in ((tape, on_id), (tape_ood, on_ood)):
            if names:
                grads = part.vjp(torch.stack([cot[t] for t in names], 1))
                rows = torch.cat([grads[order[id(p)]].reshape(len(names), -1) for p in params], 1)
                per_term.update(zip(names, rows, strict=True))
        grads = self.ranks.sum_(torch.stack([per_term[t] for t in active]))
        coefficients = pcgrad_coefficients(grads @ grads.t(), generator, obj.pcgrad_reduction)
        return coefficients.to(grads.dtype) @ grads


def _tapes(nets: Sequence[nn.Module], x: torch.Tensor, kernels: Kernels) -> list[Tape]:
    """Every network's tape on one batch, sharing conv1's patches when the networks normalise and pad alike."""
    cols, h1 = conv1_all(nets, x)
    return [Tape(net, x, cols, h1[i] if cols is not None else None, kernels) for i, net in enumerate(nets)]

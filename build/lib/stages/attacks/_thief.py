"""The attack contract (`Attack`), what an attack is given (the budgeted query callable, and the thief's own
surrogate, pool, recipe and random generator), and how it checkpoints: `thief.checkpoint(state)` hands the stage
what the attack needs to come back to that point, and a resumed run gets it back once from `thief.resume()`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.params import Param, defaults
from stages.data import prepared as _data


class Query(Protocol):
    """The black box: answers for at most `remaining` of the images (probabilities (N, K) or labels (N,))."""

    budget: int
    label: str

    @property
    def remaining(self) -> int: ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SurrogateRecipe:
    """How the thief trains its surrogate, resolved from `steal`'s flags (whose defaults are `steal`'s): SGD with a
    cosine schedule (KnockoffNets'), or Adam, and a cosine or constant learning rate."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float  # SGD only
    weight_decay: float
    optimizer: str  # "sgd" or "adam"
    schedule: str  # "cosine" (to 0 over the epochs) or "constant"

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate at `step` of `total` (epochs, or DFME's iterations)."""
        return cosine_lr(self.lr, step, total) if self.schedule == "cosine" else self.lr


@dataclass
class Thief:
    surrogate: nn.Module  # randomly initialised, the thief's architecture
    recipe: SurrogateRecipe
    num_classes: int
    input_shape: tuple[int, int, int]
    rng: torch.Generator  # every random choice of the attack
    device: str = "cpu"
    query_batch: int = 500  # images per query call
    pool: Optional[torch.Tensor] = None  # uint8 (N, C, H, W) at the victim's input shape
    end_epoch: Callable[[dict[str, float]], None] = field(default=lambda stats: None)  # the stage evaluates here
    # The stage saves {name: tensor | number} beside the surrogate, the generator, the history and the transfer set.
    checkpoint: Callable[[dict[str, Any]], None] = field(default=lambda state: None)
    resumed: dict[str, Any] = field(default_factory=dict)  # the state of the checkpoint this run resumes from
    # The victim's train split, uint8 images and labels, for an attack that holds a few labelled images (LABELLED).
    labelled: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        if r.optimizer == "adam":
            return torch.optim.Adam(self.surrogate.parameters(), lr=r.lr, weight_decay=r.weight_decay)
        return torch.optim.SGD(self.surrogate.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)

    def resume(self) -> dict[str, Any]:
        """The attack state of the checkpoint resumed from, handed over once (empty on a fresh run)."""
        state, self.resumed = self.resumed, {}
        return state


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """Every per-parameter buffer (SGD momentum; Adam's moments and step count), flat, for a checkpoint."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        f"{prefix}.{i}.{name}": value
        for i, p in enumerate(params)
        for name, value in optimizer.state.get(p, {}).items()
        if isinstance(value, torch.Tensor)
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], prefix: str) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in state.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            p = params[int(index)]
            optimizer.state[p][name] = value if name == "step" else value.to(p.device)  # Adam keeps its step on CPU


def cosine_lr(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft targets: KL(p_victim || p_surrogate), batch mean; labels: cross-entropy; `weights` scale each answer."""
    if weights is None:
        if targets.dtype.is_floating_point:
            return F.kl_div(torch.log_softmax(logits, 1), targets, reduction="batchmean")
        return F.cross_entropy(logits, targets)
    if targets.dtype.is_floating_point:
        per_answer = F.kl_div(torch.log_softmax(logits, 1), targets, reduction="none").sum(1)
    else:
        per_answer = F.cross_entropy(logits, targets, reduction="none")
    return (weights * per_answer).mean()


def query_then_train(query: Query, thief: Thief, collect, index: str) -> None:
    """The pool attacks' shape: `collect` queries and returns {index: pool indices, "targets": answers}, checkpointed
    once (a resumed run skips it), then the surrogate trains on those pool images, checkpointing every epoch."""
    state = thief.resume()
    if not state:
        state = collect(query, thief)
        thief.checkpoint(state)
    keep = {index: state[index], "targets": state["targets"]}
    train_surrogate(thief, thief.pool[keep[index]], keep["targets"], thief.recipe.epochs, keep, state)


def train_surrogate(
    thief: Thief,
    images: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    keep: Optional[dict[str, Any]] = None,
    resumed: Optional[dict[str, Any]] = None,
    weights: Optional[torch.Tensor] = None,
    extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None,
) -> None:
    """Fit thief.surrogate on a transfer set for `epochs` (the recipe's schedule); `thief.end_epoch` after each
    epoch.

    `images`: uint8 (pool images) or float in [0, 1]; `targets`: probabilities (N, K) or labels (N,); `weights`:
    a loss weight per answer; `extra_loss(surrogate)`: a term added at every step (e.g. on labelled images).
    After each epoch `thief.checkpoint` gets `keep` (the attack's state, enough to rebuild these arguments) with the
    epoch and the momentum buffers; given such a checkpoint's state as `resumed`, training continues after it.
    """
    model, recipe = thief.surrogate, thief.recipe
    optimizer = thief.optimizer()
    n = len(images)
    start = int((resumed or {}).get("epochs_trained", 0))
    if start:
        load_optimizer_state(optimizer, resumed, "optimizer")
    for epoch in range(start, epochs):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(epoch, epochs)
        model.train()
        total, steps = 0.0, 0
        for idx in _data.batches(n, recipe.batch_size, thief.rng, drop_last=n > recipe.batch_size):
            if len(idx) < 2:  # one image cannot train BatchNorm; only a one-query transfer set has such a batch
                continue
            x = images[idx].to(thief.device)
            x = _data.to_float(x) if x.dtype == torch.uint8 else x
            w = weights[idx].to(thief.device) if weights is not None else None
            loss = loss_fn(model(x), targets[idx].to(thief.device), w)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        model.eval()
        thief.end_epoch({"train_loss": total / max(1, steps), "lr": optimizer.param_groups[0]["lr"]})
        thief.checkpoint({**(keep or {}), "epochs_trained": epoch + 1, **optimizer_state(optimizer, "optimizer")})


def ask(query: Query, images: torch.Tensor, batch: int):
    """Query `images` in batches of `batch`; yield (start, answers) until done or the budget ends (short answers)."""
    for start in range(0, len(images), batch):
        if query.remaining <= 0:
            return
        chunk = images[start : start + batch]
        answers = query(_data.to_float(chunk) if chunk.dtype == torch.uint8 else chunk)
        yield start, answers
        if len(answers) < len(chunk):
            return


class Attack:
    """What every attack is. `steal` reads the class attributes to know what to supply:

    PARAMS: its `--attack-param` parameters with their defaults (the constructor sets each as an attribute);
    POOL: "required" (it queries pool images), "seeds" (it grows its queries from a few pool images, the victim's
    train split by default) or "none" (data-free);
    LABELS: the answers it accepts, "soft" and/or "hard", the first the default;
    UINT8_QUERIES: its queries are pool images, so the transfer set is stored as uint8;
    DEFAULT_EPOCHS: surrogate epochs when `--epochs` is not given;
    OPTIMIZER, SCHEDULE: the surrogate's optimizer and learning-rate schedule when `--optimizer` and `--schedule`
    are not given;
    LABELLED: it holds a few labelled images of the victim's train split (`thief.labelled`; they are not queries).
    """

    PARAMS: ClassVar[dict[str, Param]] = {}
    POOL: ClassVar[str] = "required"
    LABELS: ClassVar[tuple[str, ...]] = ("soft", "hard")
    UINT8_QUERIES: ClassVar[bool] = True
    DEFAULT_EPOCHS: ClassVar[int] = 50
    OPTIMIZER: ClassVar[str] = "sgd"
    SCHEDULE: ClassVar[str] = "cosine"
    LABELLED: ClassVar[bool] = False

    def __init__(self, **params: float | int):
        unknown = set(params) - set(self.PARAMS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no parameters {sorted(unknown)}")
        for key, value in {**defaults(self.PARAMS), **params}.items():
            setattr(self, key, int(value) if self.PARAMS[key].integer else float(value))

    def planned_epochs(self, epochs: int) -> int:
        """Surrogate evaluations the stage will see for `--epochs` (jbda: per round)."""
        return epochs

    def run(self, query: Query, thief: Thief) -> None:
        """Spend the budget through `query` and train `thief.surrogate`; call `thief.end_epoch` after every epoch."""
        raise NotImplementedError

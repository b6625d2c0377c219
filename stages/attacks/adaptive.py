"""The adaptive thief against argmax-preserving defenses: hard-label KnockoffNets with query smoothing.

It keeps only the top-1 label of every answer (discarding perturbed probabilities) and queries each pool image
`smoothing` times, the first as is and the rest randomly shifted (and flipped, for RGB); the averaged one-hot
labels are the soft target the surrogate learns with KL (`majority=1`: the majority label instead). n queries per
image: `budget // smoothing` images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.params import Param
from stages.attacks._thief import Attack, Query, Thief, ask, query_then_train
from stages.attacks.knockoff import Knockoff


def shift_flip(images: torch.Tensor, generator: torch.Generator, shift: int, flip: bool) -> torch.Tensor:
    """Random integer translations (zero fill) and optional horizontal flips: uint8 in, uint8 out (on the 8-bit
    grid)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]
    out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        out = torch.where(mirrored[:, None, None, None], out.flip(3), out)
    return out.contiguous()


class Adaptive(Attack):
    PARAMS = {
        "smoothing": Param(4, 1, 1000, True, "queries per pool image (1: plain hard-label knockoff)"),
        "shift": Param(2, 0, 16, True, "largest random translation in pixels"),
        # a thief who knows that a keyed mark rarely survives a shift: the majority label drops a mark that only
        # one of an image's views carries, where the average keeps it as a share of the target
        "majority": Param(0, 0, 1, True, "1: the target is the majority label of the views (ties: the lowest class)"),
    }
    POOL = "required"
    LABELS = ("hard", "soft")  # soft answers are cut to their top-1 label all the same
    UINT8_QUERIES = True
    DEFAULT_EPOCHS = 50
    OPTIMIZER, SCHEDULE = Knockoff.OPTIMIZER, Knockoff.SCHEDULE  # the calibrated thief's recipe
    smoothing: int
    shift: int
    majority: int

    def run(self, query: Query, thief: Thief) -> None:
        """Checkpoints after querying (the voted images as pool indices, and their targets) and after every epoch."""
        query_then_train(query, thief, self._vote, "chosen")

    def _vote(self, query: Query, thief: Thief) -> dict[str, torch.Tensor]:
        pool, k, gen = thief.pool, self.smoothing, thief.rng
        n = min(-(-query.remaining // k), len(pool))  # a last image may get fewer than k answers
        order = torch.randperm(len(pool), generator=gen)[:n]
        images = pool[order]
        votes = torch.zeros(n, thief.num_classes)
        counts = torch.zeros(n)
        per_call = max(1, thief.query_batch // k)
        flip = thief.input_shape[0] == 3
        for start in range(0, n, per_call):
            batch = images[start : start + per_call]
            views = batch.unsqueeze(1).repeat(1, k, 1, 1, 1)  # (b, k, C, H, W); view 0 is the image itself
            if k > 1:
                views[:, 1:] = shift_flip(batch.repeat_interleave(k - 1, 0), gen, self.shift, flip).view(
                    len(batch), k - 1, *batch.shape[1:]
                )
            got = 0
            for _, answers in ask(query, views.flatten(0, 1), len(views) * k):
                labels = answers.argmax(1) if answers.dim() == 2 else answers
                owner = start + torch.arange(len(labels)) // k
                votes.index_put_((owner, labels.cpu()), torch.ones(len(labels)), accumulate=True)
                counts.index_add_(0, owner, torch.ones(len(labels)))
                got = len(labels)
            if got < len(views) * k:
                break
        kept = counts > 0
        targets = votes[kept] / counts[kept, None]
        if self.majority:
            targets = F.one_hot(targets.argmax(1), thief.num_classes).float()
        return {"chosen": order[kept], "targets": targets}

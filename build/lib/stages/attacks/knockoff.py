"""KnockoffNets (Orekondy et al., 2019), random strategy: query `budget` pool images, then train the surrogate
on the answers (soft: KL(p_victim || p_surrogate); hard: cross-entropy)."""

from __future__ import annotations

import torch

from stages.attacks._thief import Attack, Query, Thief, ask, query_then_train


class Knockoff(Attack):
    POOL = "required"
    LABELS = ("soft", "hard")
    UINT8_QUERIES = True
    DEFAULT_EPOCHS = 50
    # Adam at a constant rate without weight decay, not the paper's SGD with a cosine rate: against InI's flattened
    # answers (a broad MNIST victim, 18,000 queries, 30 epochs) SGD collapsed to one class on FashionMNIST (9.7%)
    # where this recipe stole 15.8% / 19.0% (seeds 0 / 1; the Adversarial Robustness Toolbox's KnockoffNets: 23.5% /
    # 19.5%), and on Latin letters it stole 91.4% against SGD's 91.1% (ART: 92.6%)
    # (benchmarks/calibrate_knockoff.py; docs/results.md, "How strong the thief is").
    OPTIMIZER = "adam"
    SCHEDULE = "constant"

    def run(self, query: Query, thief: Thief) -> None:
        """Checkpoints after querying (the transfer set as pool indices and answers) and after every epoch."""
        query_then_train(query, thief, self._query, "order")

    def _query(self, query: Query, thief: Thief) -> dict[str, torch.Tensor]:
        pool = thief.pool
        n = min(query.remaining, len(pool))
        order = torch.randperm(len(pool), generator=thief.rng)[:n]
        images = pool[order]  # one preallocated copy: the transfer set grows linearly, never by concatenation
        soft = query.label == "soft"
        targets = torch.empty((n, thief.num_classes) if soft else (n,), dtype=torch.float32 if soft else torch.long)
        filled = 0
        for start, answers in ask(query, images, thief.query_batch):
            targets[start : start + len(answers)] = answers.cpu()
            filled = start + len(answers)
        return {"order": order[:filled], "targets": targets[:filled]}

"""Model-stealing attacks, one per file, each an `Attack` with one small interface:

    attack = ATTACKS[name](**params)      # params: the attack's PARAMS, from --attack-param KEY=VALUE
    attack.run(query, thief)              # query(images) -> probabilities | labels; thief: what the thief has

An attack never sees the victim: `query` is its only way to it, and `thief` holds only the thief's own things
(its surrogate, pool, recipe and random generator). `Attack`'s class attributes tell `steal` what to supply;
LABELLED marks a thief that holds a few labelled images of the victim's train split (`thief.labelled`; they are
not queries). The papers behind each: docs/method.md, "Attacks".

Beside them: `blackbox` (the budgeted query interface every attack goes through; a victim behind `serve` is
reached through it too, by stages/serving/client.py) and `checkpoint` (steal's resumable state).
"""

from __future__ import annotations

from stages.attacks._thief import Attack, Query, Thief
from stages.attacks.adaptive import Adaptive
from stages.attacks.confidence_search import ConfidenceSearch
from stages.attacks.dfme import DFME
from stages.attacks.jbda import JBDA, JBDATR
from stages.attacks.knockoff import Knockoff
from stages.attacks.knockoff_confident import KnockoffConfident
from stages.attacks.seeded import Seeded

ATTACKS: dict[str, type[Attack]] = {
    "knockoff": Knockoff,
    "jbda": JBDA,
    "jbda-tr": JBDATR,
    "dfme": DFME,
    "adaptive": Adaptive,
    # thieves that adapt to defenses answering outliers uninformatively, as InI does
    "knockoff-confident": KnockoffConfident,
    "confidence-search": ConfidenceSearch,
    "seeded": Seeded,
}

__all__ = ["ATTACKS", "Attack", "Query", "Thief"]

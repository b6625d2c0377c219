"""The test that names a stolen copy, on the marked queries against as many control queries (the measured null):
(1) how often the suspect's top-1 (swap marks) or runner-up (raise marks) is the class the mark points to, against
how often it is the class the key would have marked on the controls (Fisher's exact test, one-sided); (2) the
suspect's log-probability of that class, marked against controls (Mann-Whitney U, one-sided), which also sees a
mark the suspect learnt only in part. The p-value is twice the smaller of the two (Bonferroni). docs/method.md,
"Watermark"."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import fisher_exact, mannwhitneyu

ALPHA = 1e-6  # the threshold a copy is named at
FLOOR = 1e-12  # log-probabilities of classes the suspect gives 0 (a label-only answer) are log(FLOOR)


@dataclass(frozen=True)
class Outcome:
    marked: int
    marked_agree: int
    controls: int
    control_agree: int
    p_agreement: float  # Fisher's exact test on the agreement counts
    p_score: float  # Mann-Whitney U on the keyed class's log-probability
    p_value: float
    alpha: float
    stolen: bool

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(probs: np.ndarray, keyed: np.ndarray, mode: str) -> np.ndarray:
    """Where the suspect's answer carries the mark: its top-1 is the keyed class (swap marks), or its runner-up is
    (raise marks, which keep the top-1)."""
    rank = 0 if mode == "swap" else 1
    order = np.argsort(-probs, axis=1, kind="stable")
    return order[:, rank] == keyed


def score(probs: np.ndarray, keyed: np.ndarray) -> np.ndarray:
    """The suspect's log-probability of the keyed class."""
    return np.log(np.clip(probs[np.arange(len(probs)), keyed], FLOOR, 1.0))


def decide(
    marked_probs: np.ndarray,
    marked_class: np.ndarray,
    control_probs: np.ndarray,
    control_class: np.ndarray,
    mode: str,
    alpha: float = ALPHA,
) -> tuple[Outcome, np.ndarray, np.ndarray]:
    """Under the null (the suspect never saw the marked answers) a marked query and a control query of the same
    victim confidence are exchangeable: the keyed class is a keyed hash, not a property of the image. Both tests
    are exact or rank tests under that exchangeability, with no assumed chance rate such as 1/K."""
    agree_m = agreement(marked_probs, marked_class, mode)
    agree_c = agreement(control_probs, control_class, mode)
    a, n, c, m = int(agree_m.sum()), len(agree_m), int(agree_c.sum()), len(agree_c)
    p_agree = float(fisher_exact([[a, n - a], [c, m - c]], alternative="greater")[1])
    s_m, s_c = score(marked_probs, marked_class), score(control_probs, control_class)
    p_score = float(mannwhitneyu(s_m, s_c, alternative="greater").pvalue) if np.ptp(np.r_[s_m, s_c]) > 0 else 1.0
    p = min(1.0, 2.0 * min(p_agree, p_score))
    return Outcome(n, a, m, c, p_agree, p_score, p, alpha, bool(p < alpha)), agree_m, agree_c

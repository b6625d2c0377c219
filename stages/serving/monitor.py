"""Extraction monitoring per principal: query volume, the share of OOD-looking answers, the predicted-class
histogram, and PRADA; and over all principals (stages/serving/detectors.py), the footprint of many thin keys.

- Near-duplicates: a query within RMS distance `duplicate_distance` per pixel of one of the principal's last
  `ood_window` distinct queries, at a shift of up to 2 px (a retry, a test-time augmentation), is counted once by
  the OOD share, the class histogram, volume and the global window: its answer tells a thief almost nothing new,
  and counting copies of one image as independent draws inflates every count-based test.
- OOD score: the answer's top probability (maximum softmax probability, Hendrycks & Gimpel 2017). A deployed graph
  answers probabilities, whose logits are known only up to a constant, so energy scores cannot be recovered; for an
  InI victim a low top probability is its near-uniform answer to out-of-distribution queries. An answer looks OOD
  below the threshold tau, the benign q-quantile (q = 1 %): benign traffic looks OOD at rate q. A principal's
  window of its last answers alerts once k of its n answers look OOD with P(Binomial(n, q) >= k) < alpha.
- PRADA (Juuti et al., 2019): each query's minimum L2 distance to the principal's earlier queries of the same
  predicted class; natural queries give normally distributed distances, synthetic ones (JBDA, DFME) do not. The
  Shapiro-Wilk W of the window of distances (those within 3 std of their mean, as in the paper) alerts below
  delta, set just under the lowest W of a benign replay. An exact repeat of a kept query adds no distance.
- Steps: the share of the principal's last `ood_window` PRADA distances of distinct queries (not near-duplicates)
  below their class's step radius (the cohort's, detectors.Steps), or whose difference from that nearest query is
  a sign step at any distance (detectors.sign_steps), against Binomial(n, q) at alpha: a key sending sign steps
  from its own earlier queries (JBDA over one key). PRADA's distances run to the spread-out kept set
  G, so benign streams fall under the radii even less often than the cohort's (measured on MNIST: 0 of 10,000
  test-split distances, 2 of 20,000 train-split ones).
- Volume: images in the last `volume_window` seconds above `volume_limit`.
- Classes: the G-test of the principal's last `ood_window` predicted classes against its prior (its declared one,
  else the benign calibration's class shares), chi-square with K-1 degrees of freedom, alerting at alpha.

An alert fires when a signal crosses its threshold and re-arms once the signal is back below it.
"""

from __future__ import annotations

import collections
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from models.params import UserError
from stages.serving import detectors

# delta = the lowest W of the benign replay minus this. Measured on MNIST LeNet-5 victims (undefended and InI near,
# 2 epochs), windows of 2,000 distances, W read on D' (within 3 std of the mean): the val split (the default
# calibration) bottoms at W 0.951-0.967, the test split at 0.923-0.927 in file order and 0.974-0.981 shuffled;
# DFME's queries (2,000, generator width 16) fall to 0.51-0.55, JBDA's (4 rounds from 150 seeds) to 0.89.
PRADA_MARGIN = 0.05


@dataclass
class Settings:
    ood_quantile: float = 0.01  # q: share of benign answers below tau
    ood_window: int = 200  # answers per principal the share is read over
    min_images: int = 50  # answers before the share is judged
    alpha: float = 1e-6  # false-alert probability of one judgement of a benign window
    prada_window: int = 2000  # queries (and distances) a principal's PRADA state remembers
    prada_min: int = 100  # distances before the normality test (PRADA's minimum)
    prada_every: int = 25  # new distances between two tests
    volume_limit: int = 10_000  # images per volume window
    volume_window: float = 3600.0  # seconds
    duplicate_distance: float = detectors.DUPLICATE_DISTANCE  # RMS per pixel of a near-duplicate (0: none are)


@dataclass
class Calibration:
    ood_threshold: float  # tau
    prada_delta: float
    images: int  # benign answers the thresholds were read from
    source: str
    benign_ood_share: float  # share below tau on that replay (q by construction)
    benign_prada_min: float  # lowest W of the PRADA replay (nan: too few images)
    class_prior: list = field(default_factory=list)  # share of each predicted class on the benign images
    confusion: list = field(default_factory=list)  # P(answered class | true class) on them (rows: true classes)
    ood_share_by_class: list = field(default_factory=list)  # share of each true class's answers below tau
    # per predicted class: the benign (STEP_SHARE q)-quantile of a young query's step distance (detectors.Steps;
    # 0: too few benign images of the class to read it, so none of its queries counts as a step), and the
    # distances read
    step_radii: list = field(default_factory=list)
    step_counts: list = field(default_factory=list)

    def radii(self, classes: int) -> np.ndarray:
        """The step radius of each class (all 0, none a step, for a calibration without them)."""
        return np.asarray(self.step_radii or [0.0] * classes, dtype=np.float64)


def ood_scores(answers: np.ndarray) -> np.ndarray:
    """Top probability per answer: low means out-of-distribution-looking."""
    return answers.max(1)


class Prada:
    """PRADA's detector for one principal (Algorithm 1 of the paper), over a window of recent queries: the
    Shapiro-Wilk test reads D', the distances within 3 standard deviations of their mean, and a query identical to
    a kept one adds no distance. A request's queries are compared with the kept ones of their class in one matrix
    product per class, and with the request's own earlier queries in one more; they are then read in order, each
    against what was kept when its turn came."""

    def __init__(self, settings: Settings, dim: int):
        self.s = settings
        self.images = np.zeros((settings.prada_window, dim), dtype=np.float32)  # G: ring buffer of kept queries
        self.norms = np.zeros(settings.prada_window, dtype=np.float32)
        self.classes = np.full(settings.prada_window, -1, dtype=np.int64)
        self.cursor = 0
        # D_Gc, the distances of the kept queries of class c (the last prada_window), with their running sum and
        # sum of squares for T_Gc = mean - std
        self.kept: dict[int, collections.deque[float]] = {}
        self.sums: dict[int, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        self.growth = collections.defaultdict(float)  # T_Gc: a query joins G_c if farther than this
        # D, the last prada_window distances, as a ring: the test reads them as a set (a sort, a mean and a standard
        # deviation), so their order does not matter
        self.distances = np.zeros(settings.prada_window, dtype=np.float64)
        self.count = 0  # distances measured (D holds the last min(count, prada_window))
        self.fresh = 0
        self.measured: list[float] = []  # the last request's distances, in order (nan: none, or an exact repeat)
        self.signed = np.zeros(0, dtype=bool)  # and whether each is a sign step from its nearest (detectors.sign_steps)
        self.diffs: list[Optional[np.ndarray]] = []  # the request's differences from the nearest, while it is read

    def add_many(self, xs: np.ndarray, cs: np.ndarray) -> list[Optional[tuple[float, int]]]:
        """Take a request's flattened queries (N, d) and predicted classes, in order; after each, None or, when a
        test was due, W and the number of distances it read."""
        step = detectors.NOVELTY_CHUNK
        self.measured, self.diffs = [], []
        out = [w for i in range(0, len(xs), step) for w in self._chunk(xs[i : i + step], np.asarray(cs[i : i + step]))]
        moved = [i for i, diff in enumerate(self.diffs) if diff is not None]
        signed = np.zeros(len(self.diffs), dtype=bool)
        if moved:
            signed[moved] = detectors.sign_steps(np.stack([self.diffs[i] for i in moved]))
        self.signed, self.diffs = signed, []
        return out

    def _chunk(self, xs: np.ndarray, cs: np.ndarray) -> list[Optional[tuple[float, int]]]:
        xs = np.ascontiguousarray(xs, dtype=np.float32)
        squares = np.einsum("nd,nd->n", xs, xs)
        if len(xs) == 1:  # one query (batch 1): against the kept ones of its class, directly
            c, slots = int(cs[0]), np.flatnonzero(self.classes == int(cs[0]))
            sq = self.norms[slots] - 2.0 * (self.images[slots] @ xs[0]) + squares[0]
            best = (float(sq.min()), self.images[slots[int(sq.argmin())]]) if len(slots) else None
            keep = self._measure(xs[0], c, best)
            if keep:
                self._store(xs[0], squares[0], c)
            return [None if keep is None else self._test()]
        # squared distances to the kept queries of each query's class, as the ring stood before the request; a slot
        # overwritten during the request gets inf in its column
        before: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        row_of = np.empty(len(xs), dtype=np.int64)
        for c in np.unique(cs).tolist():
            rows, slots = np.flatnonzero(cs == c), np.flatnonzero(self.classes == c)
            before[c] = (slots, squares[rows, None] - 2.0 * (xs[rows] @ self.images[slots].T) + self.norms[slots][None])
            row_of[rows] = np.arange(len(rows))
        among = squares[:, None] - 2.0 * (xs @ xs.T) + squares[None]  # the request's queries between themselves
        owner = np.full(len(self.classes), -1, dtype=np.int64)  # the request's query each slot now holds
        ours: dict[int, list[int]] = collections.defaultdict(list)  # the request's kept queries of each class
        out: list[Optional[tuple[float, int]]] = []
        for i, (x, c) in enumerate(zip(xs, cs.tolist(), strict=True)):
            slots, sq = before[c]
            best: Optional[tuple[float, np.ndarray]] = None
            if len(slots):
                j = int(sq[row_of[i]].argmin())
                if sq[row_of[i], j] < np.inf:
                    best = (float(sq[row_of[i], j]), self.images[slots[j]])
            if ours[c]:
                j = ours[c][int(np.argmin(among[i, ours[c]]))]
                if best is None or float(among[i, j]) < best[0]:
                    best = (float(among[i, j]), xs[j])
            keep = self._measure(x, c, best)
            if keep is None:
                out.append(None)
                continue
            if keep:  # the slot at the cursor now holds query i
                self._forget(int(self.classes[self.cursor]), int(owner[self.cursor]), before, ours)
                owner[self.cursor] = i
                ours[c].append(i)
                self._store(x, squares[i], c)
            out.append(self._test())
        return out

    def _measure(self, x: np.ndarray, c: int, best) -> Optional[bool]:
        """PRADA's step for query x of class c, given the nearest kept query of its class (squared distance by the
        expansion, and the query itself) or None: whether x joins G, or None for an exact repeat (nothing recorded)."""
        if best is None:
            self.measured.append(math.nan)
            self.diffs.append(None)
            return True
        diff = x - best[1]  # the nearest, measured again directly: an exact repeat is exactly 0
        d = math.sqrt(float(diff @ diff))
        self.measured.append(d if d > 0 else math.nan)
        self.diffs.append(diff if d > 0 else None)
        if d == 0.0:  # a repeat of a kept query: it asks nothing new, and a spike at 0 is no sampling process
            return None
        self.distances[self.count % len(self.distances)] = d
        self.count += 1
        self.fresh += 1
        if d > self.growth[c]:
            self._grow(c, d)
            return True
        return False

    def _store(self, x: np.ndarray, square: float, c: int) -> None:
        self.images[self.cursor], self.norms[self.cursor], self.classes[self.cursor] = x, square, c
        self.cursor = (self.cursor + 1) % len(self.classes)

    def _forget(self, c: int, query: int, before: dict, ours: dict) -> None:
        """The slot at the cursor is about to be overwritten: its query (of class c; `query` when the request put
        it there) leaves G."""
        if query >= 0:
            ours[c].remove(query)
        elif c in before:
            slots, sq = before[c]
            sq[:, np.searchsorted(slots, self.cursor)] = np.inf

    def _grow(self, c: int, d: float) -> None:
        """d joins D_Gc; T_Gc = max(T_Gc, mean(D_Gc) - std(D_Gc))."""
        kept = self.kept.setdefault(c, collections.deque(maxlen=self.s.prada_window))
        sums = self.sums[c]
        if len(kept) == kept.maxlen:
            sums[0] -= kept[0]
            sums[1] -= kept[0] * kept[0]
        kept.append(d)
        sums[0] += d
        sums[1] += d * d
        mean = sums[0] / len(kept)
        self.growth[c] = max(self.growth[c], mean - math.sqrt(max(0.0, sums[1] / len(kept) - mean * mean)))

    def _test(self) -> Optional[tuple[float, int]]:
        if self.count >= self.s.prada_min and self.fresh >= self.s.prada_every:
            self.fresh = 0
            d = self.distances[: self.count]
            return shapiro_w(d[np.abs(d - d.mean()) <= 3.0 * d.std()]), len(d)  # D': D within 3 std of its mean
        return None


def shapiro_w(values: np.ndarray) -> float:
    from scipy import stats

    if np.ptp(values) == 0:  # identical distances (repeated queries): as far from normal as it gets
        return 0.0
    # scipy's test without its axis and nan-policy wrapper, which takes 80 of the 110 us a call costs on 2,000
    # distances (values here are one finite 1-d array)
    return float(getattr(stats.shapiro, "__wrapped__", stats.shapiro)(values).statistic)


def ood_cutoffs(settings: Settings) -> np.ndarray:
    """k_min(n) for n = 0..ood_window: the fewest OOD-looking answers among n with binomial tail below alpha."""
    from scipy import stats

    n = np.arange(settings.ood_window + 1)
    return stats.binom.isf(settings.alpha, n, settings.ood_quantile) + 1  # P(X >= k) < alpha  <=>  k > isf(alpha)


class Watch:
    """One principal's signals."""

    def __init__(
        self,
        settings: Settings,
        calibration: Calibration,
        cutoffs: np.ndarray,
        dim: int,
        prior: np.ndarray,
        g: float,
        step_cutoffs: np.ndarray,
    ):
        self.s, self.c, self.cutoffs = settings, calibration, cutoffs
        self.prior, self.g_cutoff = prior, g
        self.classes = detectors.ClassWindow(settings.ood_window, prior)
        self.flags: collections.deque[bool] = collections.deque(maxlen=settings.ood_window)
        self.flagged = 0
        self.volume: collections.deque[tuple[float, int]] = collections.deque()
        self.in_window = 0
        self.total = 0
        self.prada = Prada(settings, dim)
        self.novelty = detectors.Novelty(settings.ood_window, settings.duplicate_distance)
        self.novel = np.ones(0, dtype=bool)
        self.cohort_n = self.cohort_k = 0  # while young: its cohort step distances measured, those under the radius
        # its own steps: whether each of its last `ood_window` PRADA distances lies under its class's step radius
        self.radii = calibration.radii(len(prior))
        self.steps: collections.deque[bool] = collections.deque(maxlen=settings.ood_window)
        self.stepped = 0
        self.step_cutoffs = step_cutoffs  # q's binomial cutoffs: a declared prior changes the OOD share, not steps
        self.armed = {"ood_share": True, "prada": True, "volume": True, "classes": True, "steps": True}

    def warm(self, answers: np.ndarray, now: float) -> None:
        """Refill the OOD and class windows from answers recorded earlier (the ledger), without judging them: a
        signal still crossed alerts at the next answer. PRADA needs the images, which the ledger does not keep."""
        for c, flag in zip(answers.argmax(1), ood_scores(answers) < self.c.ood_threshold, strict=False):
            self.total += 1
            if len(self.flags) == self.flags.maxlen:
                self.flagged -= self.flags[0]
            self.flags.append(bool(flag))
            self.flagged += bool(flag)
            self.classes.add(int(c))

    def observe(self, images: np.ndarray, answers: np.ndarray, now: float) -> list[dict]:
        """Signals are judged after every image (an alert says at which query it fired); volume per request.
        `self.novel` is then the request's mask of distinct queries (not near-duplicates of the key's recent ones)."""
        alerts: list[dict] = []
        flags = ood_scores(answers) < self.c.ood_threshold
        images = images.astype(np.float32, copy=False)
        novel = self.novelty.distinct(images)
        # PRADA reads near-duplicates too: small steps from earlier queries are the synthetic queries it tests for
        classes = answers.argmax(1)
        tests = self.prada.add_many(images.reshape(len(images), -1), classes)
        # the steps: a distinct query's distance (a near-duplicate, a retry or an augmented copy, is no step), where
        # its class has a radius (nan distances compare False)
        radii = self.radii[classes]
        distances = np.asarray(self.prada.measured)
        measured = (novel & (distances == distances) & (radii > 0)).tolist()
        stepped = ((distances < radii) | self.prada.signed).tolist()
        for i, (c, flag) in enumerate(zip(classes.tolist(), flags, strict=False)):
            self.total += 1
            if measured[i]:
                if len(self.steps) == self.steps.maxlen:
                    self.stepped -= self.steps[0]
                self.steps.append(stepped[i])
                self.stepped += stepped[i]
            if novel[i]:  # a near-duplicate is counted once in the OOD and class windows
                if len(self.flags) == self.flags.maxlen:
                    self.flagged -= self.flags[0]
                self.flags.append(bool(flag))
                self.flagged += bool(flag)
                self.classes.add(c)
            if self.total >= self.s.min_images and self.flags:
                n = len(self.flags)
                cutoff = float(self.cutoffs[n])
                self._judge(
                    alerts,
                    "ood_share",
                    self.flagged / n,
                    cutoff / n,
                    self.flagged >= cutoff,
                    window=n,
                    ood_threshold=self.c.ood_threshold,
                )
                g = self.classes.g()
                self._judge(alerts, "classes", g, self.g_cutoff, g > self.g_cutoff, window=len(self.classes.window))
            if measured[i] and self.total >= self.s.min_images:  # judged when the window changes
                n = len(self.steps)
                cutoff = float(self.step_cutoffs[n])
                self._judge(alerts, "steps", self.stepped / n, cutoff / n, self.stepped >= cutoff, window=n)
            if tests[i] is not None:
                w, read = tests[i]
                self._judge(alerts, "prada", w, self.c.prada_delta, w < self.c.prada_delta, distances=read)
        self.novel = novel
        self.volume.append((now, int(novel.sum())))  # distinct images: a near-duplicate tells a thief almost nothing
        self.in_window += int(novel.sum())
        while self.volume and self.volume[0][0] < now - self.s.volume_window:
            self.in_window -= self.volume.popleft()[1]
        self._judge(
            alerts,
            "volume",
            self.in_window,
            self.s.volume_limit,
            self.in_window > self.s.volume_limit,
            window_seconds=self.s.volume_window,
        )
        return alerts

    def _judge(self, alerts: list[dict], signal: str, value: float, threshold: float, crossed: bool, **details) -> None:
        if crossed and self.armed[signal]:
            alerts.append(
                dict(signal=signal, value=float(value), threshold=float(threshold), queries=self.total, details=details)
            )
        self.armed[signal] = not crossed


class Monitor:
    """Every principal's Watch, created on its first answered query, and the global view over all of them."""

    def __init__(
        self,
        settings: Settings,
        calibration: Calibration,
        dim: int,
        priors: Optional[dict[str, list]] = None,
        global_settings: Optional[detectors.GlobalSettings] = None,
    ):
        self.settings, self.calibration, self.dim = settings, calibration, dim
        self.cutoffs = ood_cutoffs(settings)
        self.watches: dict[str, Watch] = {}
        benign = np.asarray(calibration.class_prior, dtype=np.float64)
        self.classes = len(benign)
        self.benign_prior = detectors.floored(benign)
        # a declared prior is over the classes the client sends; its answers carry the victim's errors on them
        # and its OOD-looking share is the declared mixture of each class's benign share, not q
        confusion = np.asarray(calibration.confusion) if calibration.confusion else np.eye(self.classes)
        shares = np.asarray(calibration.ood_share_by_class or [settings.ood_quantile] * self.classes)
        self.priors = {name: detectors.floored(np.asarray(p) @ confusion) for name, p in (priors or {}).items()}
        self.key_cutoffs = {  # (judgement, link) OOD cutoffs of the keys with a declared prior
            name: tuple(
                ood_cutoffs(Settings(**{**asdict(settings), "alpha": a, "ood_quantile": float(np.dot(p, shares))}))
                for a in (settings.alpha, (global_settings or detectors.GlobalSettings()).link_alpha)
            )
            for name, p in (priors or {}).items()
        }
        self.g_cutoff = detectors.g_cutoff(settings.alpha, self.classes)
        self.global_settings = global_settings or detectors.GlobalSettings(
            alpha=settings.alpha, min_images=settings.min_images
        )
        self.all = detectors.Global(self.global_settings, settings.ood_quantile, benign, self._stands_out)
        self.link_cutoffs = ood_cutoffs(Settings(**{**asdict(settings), "alpha": self.global_settings.link_alpha}))
        self.steps = detectors.Steps(detectors.step_memory(self.classes), dim, self.classes)
        self.radii = calibration.radii(self.classes)
        self.link_g = detectors.g_cutoff(self.global_settings.link_alpha, self.classes)

    def _stands_out(self, principal: str, cohort: bool = False) -> bool:
        """The key's last `ood_window` answers at link_alpha: its OOD count, or its class histogram's G; for a
        cohort signal, only while the key is young (fewer than min_images answers)."""
        watch = self.watches.get(principal)
        if watch is None or not watch.flags or (cohort and watch.total >= self.settings.min_images):
            return False
        n = len(watch.flags)
        cutoffs = self.key_cutoffs[principal][1] if principal in self.key_cutoffs else self.link_cutoffs
        steps = detectors.binomial_tail(watch.cohort_k, watch.cohort_n, self.settings.ood_quantile)
        return watch.flagged >= cutoffs[n] or watch.classes.g() > self.link_g or steps < self.global_settings.link_alpha

    def _watch(self, principal: str) -> Watch:
        watch = self.watches.get(principal)
        if watch is None:
            prior = self.priors.get(principal, self.benign_prior)
            cutoffs = self.key_cutoffs[principal][0] if principal in self.key_cutoffs else self.cutoffs
            watch = Watch(self.settings, self.calibration, cutoffs, self.dim, prior, self.g_cutoff, self.cutoffs)
            self.watches[principal] = watch
        return watch

    def observe(self, principal: str, images: np.ndarray, answers: np.ndarray, now: float) -> list[dict]:
        """The principal's alerts, then the global ones (scope "global", with the keys they link)."""
        watch = self._watch(principal)
        young = watch.total < self.settings.min_images
        alerts = watch.observe(images, answers, now)
        novel = watch.novel  # the global window, too, counts a key's near-duplicates once
        flags = ood_scores(answers[novel]) < self.calibration.ood_threshold
        declared = self.priors.get(principal)
        classes = answers[novel].argmax(1)
        steps = (0, 0)
        if young:  # a young key's distinct queries: steps from the young cohort's earlier ones
            d, signs = self.steps.measure(images[novel].reshape(len(classes), -1), classes)
            measured = np.isfinite(d) & (self.radii[classes] > 0)
            steps = (int(measured.sum()), int((measured & ((d < self.radii[classes]) | signs)).sum()))
            watch.cohort_n, watch.cohort_k = watch.cohort_n + steps[0], watch.cohort_k + steps[1]
        for alert in self.all.observe(principal, young, flags, classes, now, declared, steps):
            alerts.append({**alert, "scope": "global"})
        return alerts

    def warm(self, principal: str, answers: np.ndarray, now: float) -> None:
        """Replay answers the ledger holds (oldest first) into the principal's windows."""
        self._watch(principal).warm(answers, now)

    def warm_global(self, principal: str, answers: np.ndarray, now: float, spent_before: int) -> None:
        """Replay a request the ledger holds into the global window (its alerts are not raised again)."""
        young = spent_before < self.settings.min_images
        flags = ood_scores(answers) < self.calibration.ood_threshold
        self.all.observe(principal, young, flags, answers.argmax(1), now, self.priors.get(principal))

    def describe(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "calibration": asdict(self.calibration),
            "global": asdict(self.global_settings),
            "declared_priors": {k: list(map(float, v)) for k, v in self.priors.items()},
        }


def check(settings: Settings, global_settings: detectors.GlobalSettings, throttle_factor: float) -> None:
    """Settings that cannot monitor anything, refused in one line before the server starts."""
    if not 0 < settings.ood_quantile < 1 or not 0 < settings.alpha < 1 or not 0 < global_settings.link_alpha < 1:
        raise UserError("--ood-quantile, --alpha and --link-alpha must lie strictly between 0 and 1")
    if settings.min_images > settings.ood_window:
        raise UserError(f"--min-images {settings.min_images} exceeds --ood-window {settings.ood_window}: never judged")
    if not global_settings.window > 0 or not settings.volume_window > 0:
        raise UserError("--global-window and --volume-window must be > 0 seconds")
    if global_settings.link_alpha < settings.alpha:
        raise UserError("--link-alpha must be >= --alpha (linking is the looser test, under an alert already)")
    if not 0 < throttle_factor <= 1:
        raise UserError(f"--throttle-factor {throttle_factor}: a throttled rate must be > 0 (use block to stop a key)")


def calibrate(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    settings: Settings,
    source: str,
    seed: int = 0,
    prada_images: int = 3000,
    chunk: int = 512,
    labels: Optional[np.ndarray] = None,
) -> Calibration:
    """Thresholds from benign traffic: `images` (uint8 or float in [0, 1]) answered by the served graph; tau is
    their q-quantile of top probability, and delta sits just under the lowest W of PRADA on up to `prada_images`
    of them replayed in a random order as one client. With `labels`, the confusion P(answered class | true class)
    that turns a declared prior over true classes into the prior of the answers."""
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    answers = np.concatenate([predict(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    scores = ood_scores(answers)
    tau = float(np.quantile(scores, settings.ood_quantile))
    order = np.random.default_rng(seed).permutation(len(x))[:prada_images]
    prada = Prada(settings, x[0].size)
    tests = prada.add_many(x[order].reshape(len(order), -1), answers[order].argmax(1))
    ws = [test[0] for test in tests if test is not None]
    low = min(ws) if ws else float("nan")
    delta = max(0.0, low - PRADA_MARGIN) if ws else 0.0  # too few images: PRADA cannot alert
    k = answers.shape[1]
    classes = np.bincount(answers.argmax(1), minlength=k) / len(answers)
    confusion, by_class = np.eye(k), []
    if labels is not None:
        y = np.asarray(labels, dtype=np.int64)
        # floored at q / 10 so a class with no OOD-looking benign answer does not make one such answer an alert
        by_class = [
            max(
                float((scores[y == c] < tau).mean()) if (y == c).any() else settings.ood_quantile,
                settings.ood_quantile / 10,
            )
            for c in range(k)
        ]
        joint = np.zeros((k, k))
        np.add.at(joint, (np.asarray(labels, dtype=np.int64), answers.argmax(1)), 1.0)
        seen = joint.sum(1) > 0
        confusion[seen] = joint[seen] / joint[seen].sum(1, keepdims=True)
    share = detectors.STEP_SHARE * settings.ood_quantile
    radii, counts = detectors.step_radii(x.reshape(len(x), -1), answers.argmax(1), k, share, seed=seed)
    return Calibration(
        step_radii=radii,
        step_counts=counts,
        class_prior=[float(v) for v in classes],
        confusion=confusion.round(6).tolist(),
        ood_share_by_class=by_class,
        ood_threshold=tau,
        prada_delta=delta,
        images=len(x),
        source=source,
        benign_ood_share=float((scores < tau).mean()),
        benign_prada_min=low,
    )

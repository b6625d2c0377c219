"""Detectors beyond one principal's OOD share and PRADA: the predicted-class histogram of a principal against its
benign prior (a G-test), and the global view over every principal in a time window (the OOD share of all answers,
and of the young keys, those not yet judged on their own, with their class histogram), which links the keys behind
a campaign spread thinly over many. Thresholds follow the monitor's alpha; the equations are in docs/method.md.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from models.params import UserError

# A prior is mixed with this share of the uniform one before testing: a class the prior gives 0 (a declared
# form-reader prior of 1s and 7s) still gets the odd misread answer without an infinite G statistic.
PRIOR_FLOOR = 0.02


@dataclass
class GlobalSettings:
    window: float = 3600.0  # seconds of traffic the global signals read
    alpha: float = 1e-6  # false-alert probability of one judgement of benign traffic
    link_alpha: float = 1e-3  # a key is linked to a global alert when its own evidence is below this
    min_images: int = 50  # answers of the young cohort before it is judged
    class_window: int = 2000  # the young cohort's last answers its class histogram is read over


def floored(prior: np.ndarray) -> np.ndarray:
    prior = np.asarray(prior, dtype=np.float64)
    return (1.0 - PRIOR_FLOOR) * prior / prior.sum() + PRIOR_FLOOR / len(prior)


def g_cutoff(alpha: float, classes: int) -> float:
    from scipy import stats

    return float(stats.chi2.isf(alpha, classes - 1))


def binomial_tail(k: int, n: int, q: float) -> float:
    """P(Binomial(n, q) >= k), from the special function itself: it is read at every request, and stats.binom.sf
    costs about 40 us a call against about 1 us."""
    from scipy import special

    return float(special.bdtrc(k - 1, n, q)) if k > 0 else 1.0


def check_prior(prior, classes: int, where: str) -> np.ndarray:
    """A declared prior: `classes` non-negative shares summing to 1, or a one-line error."""
    try:
        p = np.asarray([float(v) for v in prior], dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{where}: the prior must be a list of numbers") from None
    if len(p) != classes:
        raise UserError(f"{where}: the prior has {len(p)} shares, the model has {classes} classes")
    if not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1.0) > 1e-3:
        raise UserError(f"{where}: the prior's shares must be >= 0 and sum to 1 (they sum to {p.sum():.4g})")
    return p


# A near-duplicate is compared at every shift of up to this many pixels each way: test-time augmentation and
# retries move an image by a few pixels, which alone puts an MNIST digit 0.02-0.43 RMS from itself.
DUPLICATE_SHIFT = 2
# The default RMS distance per pixel of a near-duplicate. Measured at the best shift, over the image less its 2 px
# border: a copy shifted by up to 2 px with +-12 grey levels of noise lies 0.019-0.024 from its original on MNIST,
# 0.020-0.025 on Latin letters and 0.021-0.029 on FashionMNIST (0.028 for noise that never clips); an image lies
# 0.062 or more from the nearest of the 200 before it (MNIST test; Latin letters 0.071, FashionMNIST 0.067); JBDA's
# sign steps of lambda 0.05 and 0.1 move a digit 0.035-0.040 and 0.070-0.080.
DUPLICATE_DISTANCE = 0.04


def shifted(images: np.ndarray, shift: int = DUPLICATE_SHIFT) -> np.ndarray:
    """The interior of each image (N, C, H, W) seen at every shift of up to `shift` pixels along H and W: the
    (2 shift + 1)^2 windows of its size less 2 shift, flattened, (N, (2 shift + 1)^2, C (H - 2 shift) (W - 2 shift)).
    Only pixels inside the image are compared, whatever a shifted copy filled its border with."""
    n, c, h, w = images.shape
    views = np.lib.stride_tricks.sliding_window_view(images, (h - 2 * shift, w - 2 * shift), axis=(2, 3))
    return views.transpose(0, 2, 3, 1, 4, 5).reshape(n, (2 * shift + 1) ** 2, -1)


# Images are compared in chunks of this many queries: one chunk's comparisons are a few matrix products, and a
# large request (1,024 images) does not build a 1,024 x 1,024 x 25 table.
NOVELTY_CHUNK = 64
# Pixels per side of the blocks whose sums prefilter the comparison: the block sums (divided by the block's side)
# are the coordinates of an orthogonal projection, so their distance is a lower bound of the full distance, and
# only the pairs that bound lets through are compared pixel by pixel. On MNIST a 24 x 24 interior becomes 36
# numbers, and about one stored query per query passes (MNIST test digits against the last 200).
NOVELTY_BLOCK = 4


def _box_sums(images: np.ndarray, b: int) -> np.ndarray:
    """Sums over the b x b box at every position of each image (N, C, H, W) -> (N, C, H - b + 1, W - b + 1)."""
    height, width = images.shape[2:]
    rows = images[:, :, : height - b + 1].copy()  # added in place, in the same order as a sum of the slices
    for k in range(1, b):
        rows += images[:, :, k : height - b + 1 + k]
    out = rows[..., : width - b + 1].copy()
    for k in range(1, b):
        out += rows[..., k : width - b + 1 + k]
    return out


def block_sums(interiors: np.ndarray) -> np.ndarray:
    """Block sums of interiors (N, C, h, w), as `interior_sketch` gives them for one view: (N, C blocks)."""
    n, c, h, w = interiors.shape
    b = NOVELTY_BLOCK if min(h, w) >= NOVELTY_BLOCK else 1
    x = interiors[:, :, : h - h % b, : w - w % b].reshape(n, c, h // b, b, w // b, b)
    return (x.sum(axis=(3, 5)) / b).reshape(n, -1)


def interior_sketch(images: np.ndarray, shift: int = DUPLICATE_SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """For each image (N, C, H, W) and each view of `shifted`: the view's squared norm (N, S), and its block sums
    over b x b blocks divided by b (b = NOVELTY_BLOCK, 1 for an interior narrower than that; pixels past the last
    whole block are left out), (N, S, C blocks), without building the views: both are read from the box sums of
    the image and of its square at every position."""
    n, c, height, width = images.shape
    h, w = height - 2 * shift, width - 2 * shift
    b = NOVELTY_BLOCK if min(h, w) >= NOVELTY_BLOCK else 1
    offsets = np.arange(2 * shift + 1)
    rows = (offsets[:, None] + b * np.arange(h // b)[None])[:, None, :, None]  # (dy, 1, i, 1): a block's top
    cols = (offsets[:, None] + b * np.arange(w // b)[None])[None, :, None, :]  # (1, dx, 1, j): its left
    views = (2 * shift + 1) ** 2
    sums = _box_sums(images, b)[..., rows, cols]  # (N, C, dy, dx, i, j)
    coarse = (sums / b).transpose(0, 2, 3, 1, 4, 5).reshape(n, views, -1)
    if h % b or w % b:  # the blocks leave pixels out: the norms from the views themselves
        shifts = shifted(images, shift)
        return np.einsum("nsd,nsd->ns", shifts, shifts), coarse
    squares = _box_sums(images * images, b)[..., rows, cols].sum(axis=(1, 4, 5)).reshape(n, views)
    return squares, coarse


def half_norms(coarse: np.ndarray) -> np.ndarray:
    """Half the squared norm of each view's block sums (N, S, p), as a column (N S, 1)."""
    return 0.5 * np.einsum("nsp,nsp->ns", coarse, coarse).reshape(-1, 1)


def within(
    images, squares, coarse, store, store_squares, store_coarse, radius: float, only=None, coarse_half=None
) -> np.ndarray:
    """(N, M) bool: some view (`shifted`) of query n lies within `radius` of stored interior m. images (N, C, H, W)
    with their views' squared norms (N, S) and block sums (N, S, p); store (M, d) with its squared norms (M,) and
    block sums (M, p); `only`, an (N, M) mask of the pairs wanted; `coarse_half`, `half_norms(coarse)` when the
    caller has it. The block sums bound the distance from below; only the pairs under the radius by that bound are
    compared in full."""
    r2 = radius * radius
    n_views, p = coarse.shape[1:]
    # bound < r2  <=>  a.b - |a|^2 / 2 - |b|^2 / 2 > -r2 / 2, in place on one (N S, M) product; r2 widened by float
    # error, so that no pair within the radius is dropped before the full comparison
    half = coarse.reshape(-1, p) @ store_coarse.T
    half -= half_norms(coarse) if coarse_half is None else coarse_half
    half -= 0.5 * np.einsum("mp,mp->m", store_coarse, store_coarse)[None]
    hits = (half > -0.5 * (r2 * (1 + 1e-4) + 1e-5)).reshape(len(images), n_views, -1).any(axis=1)
    n, m = np.nonzero(hits if only is None else hits & only)
    out = np.zeros((len(images), len(store)), dtype=bool)
    if not len(n):
        return out
    queries, starts = np.unique(n, return_index=True)  # np.nonzero lists the pairs by query
    views = shifted(images[queries])
    for view, i, first, last in zip(views, queries, starts, [*starts[1:], len(n)], strict=True):
        ms = m[first:last]
        full = squares[i][:, None] - 2.0 * (view @ store[ms].T) + store_squares[ms][None]
        out[i, ms] = full.min(axis=0) < r2
    return out


class Novelty:
    """One principal's last `size` distinct queries. A query is a near-duplicate when one of them lies within RMS
    distance `distance` per pixel of it at some shift of up to DUPLICATE_SHIFT pixels (over the interior: the
    image less that border); only distinct queries are kept. `distance` 0 makes every query distinct. A request is
    compared in chunks of NOVELTY_CHUNK queries, each against the kept queries and against itself at once, then
    read in order: a query is compared with what was kept when its turn came, its request's earlier queries
    included."""

    def __init__(self, size: int, distance: float):
        self.size, self.distance = size, distance
        self.images: Optional[np.ndarray] = None  # interiors of the kept queries
        self.coarse: Optional[np.ndarray] = None  # their block sums
        self.squares = np.full(size, np.inf, dtype=np.float32)  # their squared norms (inf: an empty slot)
        self.cursor = 0

    def distinct(self, images: np.ndarray) -> np.ndarray:
        """Take one request's queries (N, C, H, W) in [0, 1], in order; return which are distinct."""
        if self.distance <= 0 or min(images.shape[2:]) <= 2 * DUPLICATE_SHIFT:
            return np.ones(len(images), dtype=bool)
        return np.concatenate(
            [self._chunk(images[i : i + NOVELTY_CHUNK]) for i in range(0, len(images), NOVELTY_CHUNK)]
        )

    def _chunk(self, images: np.ndarray) -> np.ndarray:
        s, n = DUPLICATE_SHIFT, len(images)
        middle = np.ascontiguousarray(images[:, :, s:-s, s:-s])  # shift (0, 0): the interior itself
        middle_coarse, middle = block_sums(middle), middle.reshape(n, -1)
        if self.images is None:
            self.images = np.zeros((self.size, middle.shape[1]), dtype=np.float32)
            self.coarse = np.zeros((self.size, middle_coarse.shape[1]), dtype=np.float32)
        radius = self.distance * math.sqrt(middle.shape[1])
        if n == 1:  # one query (batch 1): compared in full with the kept ones whose norm allows a match
            views = shifted(images)[0]
            squares = np.einsum("sd,sd->s", views, views)
            norms, kept = np.sqrt(squares), np.sqrt(self.squares)  # | |view| - |y| | <= |view - y|; inf: empty
            near = np.flatnonzero((kept >= norms.min() - radius) & (kept <= norms.max() + radius))
            full = self.squares[near, None] - 2.0 * (self.images[near] @ views.T) + squares[None]
            if len(near) and float(full.min()) < radius * radius:
                return np.zeros(1, dtype=bool)
            self._keep(middle[0], middle_coarse[0], squares[(len(squares) - 1) // 2])
            return np.ones(1, dtype=bool)
        squares, coarse = interior_sketch(images)
        coarse_half = half_norms(coarse)  # read by both comparisons below
        at = (squares.shape[1] - 1) // 2
        live = np.isfinite(self.squares)
        old = np.zeros((n, self.size), dtype=bool)
        if live.any():
            slots = np.flatnonzero(live)
            store = self.images[slots], self.squares[slots], self.coarse[slots]
            old[:, slots] = within(images, squares, coarse, *store, radius, coarse_half=coarse_half)
        earlier = np.tri(n, k=-1, dtype=bool)  # a query against its request's earlier ones
        new = within(images, squares, coarse, middle, squares[:, at], middle_coarse, radius, earlier, coarse_half)
        out = np.ones(n, dtype=bool)
        kept: list[int] = []
        hit = (old.any(axis=1) | new.any(axis=1)).tolist()  # most queries are near nothing: no per-query mask read
        for i in range(n):
            if hit[i] and (old[i, live].any() or new[i, kept].any()):
                out[i] = False
                continue
            live[self.cursor] = False  # the slot's earlier query is forgotten; this one is compared through `new`
            self._keep(middle[i], middle_coarse[i], squares[i, at])
            kept = [*kept, i][-self.size :]  # a request longer than the memory forgets its own first ones
        return out

    def _keep(self, middle: np.ndarray, coarse: np.ndarray, square: float) -> None:
        self.images[self.cursor], self.coarse[self.cursor], self.squares[self.cursor] = middle, coarse, square
        self.cursor = (self.cursor + 1) % self.size


class ClassWindow:
    """One principal's last `size` predicted classes, their counts, and the G statistic of the counts against
    `prior` (floored): G = 2 sum_k n_k ln(n_k / (n p_k)), the multinomial likelihood ratio, chi-square with K-1
    degrees of freedom under the prior (Wilks). It is kept up to date one class at a time as
    G = 2 (sum_k n_k ln n_k - n ln n - sum_k n_k ln p_k), whose two sums change by one term each when a class enters
    or leaves, so reading G after every answer costs O(1) instead of a pass over the classes."""

    def __init__(self, size: int, prior: np.ndarray):
        self.window: collections.deque[int] = collections.deque(maxlen=size)
        self.counts = np.zeros(len(prior), dtype=np.float64)
        self.log_prior = np.log(np.asarray(prior, dtype=np.float64)).tolist()
        self.n_log_n = 0.0  # sum_k n_k ln n_k
        self.n_log_p = 0.0  # sum_k n_k ln p_k

    def add(self, c: int) -> None:
        if len(self.window) == self.window.maxlen:
            self._move(self.window[0], -1)
        self.window.append(c)
        self._move(c, +1)

    def _move(self, c: int, by: int) -> None:
        n = self.counts[c]
        self.n_log_n += _x_log_x(n + by) - _x_log_x(n)
        self.n_log_p += by * self.log_prior[c]
        self.counts[c] = n + by

    def g(self) -> float:
        """G of the window's counts against the prior."""
        n = len(self.window)
        return max(0.0, 2.0 * (self.n_log_n - _x_log_x(n) - self.n_log_p)) if n else 0.0


def _x_log_x(x: float) -> float:
    return x * math.log(x) if x > 0 else 0.0


# A sign step (JBDA's x + lambda sign(g), clipped to [0, 1]) moves every pixel it does not clip by the same lambda,
# up or down, whatever lambda is: the test below reads that pattern, not a distance, so widening the step does not
# hide it. Measured on the MNIST test split (each digit against the nearest of the 200 before it of its class), a
# benign difference puts at most 0.55 of its changed pixels within one grey level of one magnitude (99.9 %: 0.48;
# an augmented replay 0.44, FashionMNIST 0.43, Latin letters 0.23); a sign step of the victim's gradient puts 0.70
# or more there at lambda 0.3 (0.65 at 0.5; FashionMNIST 0.54, its 1 % quantile 0.59). A step moves pixels both
# ways (the minority sign holds 1.3 % or more of those pixels on MNIST at lambda 0.3, 0.8 % at 0.5), where a
# brightness shift, which test-time augmentation sends, moves them one way only.
SIGN_STEP_EVEN = 0.6  # share of the changed pixels at one magnitude
SIGN_STEP_BOTH = 0.005  # share of those moved the other way
SIGN_STEP_PIXELS = 20  # fewer changed pixels than this tell no pattern


def sign_steps(diffs: np.ndarray) -> np.ndarray:
    """Which differences (N, d) (each x - its nearest earlier query, on [0, 1]) are sign steps: at least
    SIGN_STEP_EVEN of the pixels one changes by half a grey level or more lie within one grey level of one
    magnitude, and at least SIGN_STEP_BOTH of those moved the other way from the rest."""
    n = len(diffs)
    levels = np.rint(np.abs(diffs) * 255.0).astype(np.int64)
    changed = levels > 0
    total = changed.sum(axis=1)
    counts = np.bincount((np.arange(n)[:, None] * 258 + levels)[changed], minlength=258 * n).reshape(n, 258)
    window = counts[:, :-2] + counts[:, 1:-1] + counts[:, 2:]  # column m: the levels m to m + 2
    low = window.argmax(axis=1)  # the fullest three-level window of each difference
    at = changed & (levels >= low[:, None]) & (levels <= low[:, None] + 2)
    held = at.sum(axis=1)
    up = (at & (diffs > 0)).sum(axis=1)
    return (
        (total >= SIGN_STEP_PIXELS)
        & (held >= SIGN_STEP_EVEN * total)
        & (np.minimum(up, held - up) >= SIGN_STEP_BOTH * held)
    )


# The young cohort's last STEP_MEMORY / K queries of each of K predicted classes (at least 20) are what a young
# query's step is measured against: a fixed number per class, so a benign query's distance to its nearest does not
# depend on the traffic's mix of classes, and the calibrated radius holds whatever classes the young keys send.
# 200 per class on a 10-class task, as PRADA's window of 2,000.
STEP_MEMORY = 2000


def step_memory(classes: int) -> int:
    return max(20, STEP_MEMORY // classes)


class Steps:
    """Queries that are small steps from an earlier query of another young key: JBDA's children, each a sign step
    of lambda from a parent some earlier key sent (lambda 0.1 puts a digit 1.5-2.5 in L2 from it, where a benign
    MNIST query lies 2.7-4.5 or more from the nearest of the last 200 of its class at the 1 % quantile, 1.35 for
    1s). Each young query's L2 distance to the nearest of the last `size` distinct young queries of its predicted
    class, its own request's earlier ones included; nan for a class with nothing kept yet. An exact repeat
    (distance 0) carries the distance of the query it repeats and is not kept again: a repeat of a natural image
    (benign clients resend popular ones) is no step, and a repeat of a step is one (a thief re-asking, through a
    fresh key, the steps a blocked key was refused). Beside the distance, whether the difference from that nearest
    is a sign step (`sign_steps`), at any lambda; a repeat carries that too."""

    def __init__(self, size: int, dim: int, classes: int):
        self.images = np.zeros((classes, size, dim), dtype=np.float32)  # pages are mapped as classes first use them
        self.squares = np.full((classes, size), np.inf, dtype=np.float32)  # inf: an empty slot
        self.distances = np.full((classes, size), np.nan)  # each kept query's own distance
        self.signs = np.zeros((classes, size), dtype=bool)  # and whether it was a sign step
        self.cursor = np.zeros(classes, dtype=np.int64)

    def measure(self, xs: np.ndarray, cs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Take one request's flattened queries (N, d) and predicted classes; return their distances and which are
        sign steps. A request is read in chunks of up to `size` queries per class, each query against the memory as
        its chunk began and the chunk's earlier queries."""
        xs = np.ascontiguousarray(xs, dtype=np.float32)
        out, signs = np.full(len(xs), np.nan), np.zeros(len(xs), dtype=bool)
        size = self.images.shape[1]
        for c in np.unique(cs).tolist():
            rows = np.flatnonzero(cs == c)
            for at in range(0, len(rows), size):
                part = rows[at : at + size]
                out[part], signs[part] = self._class(xs[part], c)
        return out, signs

    def _class(self, xs: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        squares = np.einsum("nd,nd->n", xs, xs)
        live = np.flatnonzero(np.isfinite(self.squares[c]))
        old = self.squares[c, live][None] - 2.0 * (xs @ self.images[c, live].T) + squares[:, None]
        among = squares[None] - 2.0 * (xs @ xs.T) + squares[:, None]
        among[np.triu_indices(len(xs))] = np.inf  # each query against its request's earlier ones only
        nearest = np.concatenate([old, among], axis=1)
        out, signs = np.full(len(xs), np.nan), np.zeros(len(xs), dtype=bool)
        kept = np.ones(len(xs), dtype=bool)
        diffs, fresh = np.zeros_like(xs), np.zeros(len(xs), dtype=bool)
        source = np.full(len(xs), -1)  # a repeat of the request's own earlier query: which
        for i in range(len(xs)):
            if nearest.shape[1] == 0:
                break
            j = int(nearest[i].argmin())
            if not np.isfinite(nearest[i, j]):
                continue
            other = self.images[c, live[j]] if j < len(live) else xs[j - len(live)]
            diffs[i] = xs[i] - other  # the nearest measured again directly: an exact repeat is exactly 0
            d = math.sqrt(float(diffs[i] @ diffs[i]))
            if d > 0:
                out[i], fresh[i] = d, True
            elif j < len(live):  # an exact repeat: the distance and sign step of the query it repeats
                out[i], signs[i], kept[i] = self.distances[c, live[j]], self.signs[c, live[j]], False
            else:
                out[i], source[i], kept[i] = out[j - len(live)], j - len(live), False
        signs[fresh] = sign_steps(diffs[fresh])
        for i in np.flatnonzero(source >= 0).tolist():  # in order: a repeat's source comes before it
            signs[i] = signs[source[i]]
        for x, square, d, sign in zip(xs[kept], squares[kept], out[kept], signs[kept], strict=True):  # the ring
            at = self.cursor[c]  # the oldest overwritten
            self.images[c, at], self.squares[c, at], self.distances[c, at], self.signs[c, at] = x, square, d, sign
            self.cursor[c] = (at + 1) % self.images.shape[1]
        return out, signs


# A step's radius is the benign quantile STEP_SHARE x q of the distance, and the cohort's count of steps is tested
# against q: the calibration split is not the traffic served. With radii read on the val split (true classes, 4
# orders), the test split's queries fall under them at 0.41-0.45 % on MNIST and 0.48-0.60 % on FashionMNIST (3
# orders each), 2-3 times the calibrated 0.2 %, and JBDA's queries (sign steps of lambda 0.1 from earlier ones) at
# 77-79 % (MNIST) and 34 % (FashionMNIST) of those measured.
STEP_SHARE = 0.2
STEP_ORDERS = 4  # random orders the benign images are replayed in: more distances for a small quantile


def step_radii(
    images: np.ndarray, classes: np.ndarray, k: int, share: float, size: Optional[int] = None, seed: int = 0
) -> tuple[list[float], list[int]]:
    """The `share`-quantile of each of the k classes' benign step distances (`Steps` over `images` (N, d), replayed in
    STEP_ORDERS random orders), read only once the class's memory is full: the state the cohort's memory is in
    after warm-up. A class with fewer than 100 such distances gets radius 0 (none of its queries counts as a step).
    Returns the radii and the number of distances each was read from."""
    size = size or step_memory(k)
    found: list[list[np.ndarray]] = [[] for _ in range(k)]
    for order in np.random.default_rng(seed).spawn(STEP_ORDERS):
        order = order.permutation(len(images))
        steps, seen = Steps(size, images.shape[1], k), np.zeros(k, dtype=np.int64)
        full = np.zeros(len(order), dtype=bool)
        for i, c in enumerate(classes[order].tolist()):
            full[i] = seen[c] >= size
            seen[c] += 1
        d = np.concatenate(
            [
                steps.measure(images[order[i : i + 512]], classes[order[i : i + 512]])[0]
                for i in range(0, len(order), 512)
            ]
        )
        for c in range(k):
            found[c].append(d[(classes[order] == c) & full & np.isfinite(d)])
    radii, counts = [], []
    for c in range(k):
        ds = np.concatenate(found[c])
        counts.append(len(ds))
        radii.append(float(np.quantile(ds, share)) if len(ds) >= 100 else 0.0)
    return radii, counts


BUCKETS = 60  # the global window is kept as this many time buckets of counts, so its memory does not grow with traffic


@dataclass
class Bucket:
    start: float
    n: int = 0
    ood: int = 0
    young_n: int = 0  # answers to keys that had fewer than min_images answers before the request
    young_ood: int = 0
    steps_n: int = 0  # the young answers' step distances measured (`Steps`), and those under their class's radius
    steps_k: int = 0
    principals: Optional[set] = None


class Global:
    """Every principal's answers over the last `window` seconds (in BUCKETS time buckets: the oldest bucket leaves
    whole, so the window is exact to within window/BUCKETS). Signals, each a test at `alpha` against benign
    traffic (q: the calibrated OOD quantile; prior: the calibrated class shares):
    - global_ood: all answers' OOD count against Binomial(n, q);
    - cohort_ood: the same for the young keys (fewer than min_images answers: never judged on their own);
    - cohort_classes: the young keys' last `class_window` classes against the prior (G-test);
    - cohort_steps: the young queries within their class's step radius of an earlier young query, or a sign step
      from it at any distance (`Steps`), against Binomial(n, q): the radius is the benign (STEP_SHARE q)-quantile
      of the distance, and benign differences are no sign steps.
    A crossing alerts once (re-armed when back below) and links the keys of the window that stand out on their own
    at link_alpha (`stands_out`); while it stays crossed, each key that comes to stand out is linked too (an alert
    with `continued`). A cohort signal links only keys still young: a key judged on its own is covered by its own
    signals at alpha, and re-testing it at link_alpha at every request while the alert lasts would link any long
    benign stream sooner or later."""

    def __init__(
        self,
        settings: GlobalSettings,
        q: float,
        prior: np.ndarray,
        stands_out: Optional[Callable[[str, bool], bool]] = None,
    ):
        # stands_out(key, cohort): whether the key's own recent answers stand out at link_alpha, and for a cohort
        # signal (which reads only the young keys' answers) whether the key is still young (the monitor reads its
        # per-key windows: a test over a key's whole window would flag any small mismatch of a long benign stream)
        self.s, self.q, self.prior, self.stands_out = settings, q, floored(prior), stands_out
        self.buckets: collections.deque[Bucket] = collections.deque()
        self.n = self.ood = 0
        self.young_n = self.young_ood = 0
        self.steps_n = self.steps_k = 0
        self.per: collections.Counter = collections.Counter()  # principal -> buckets of the window it answered in
        self.young_classes = ClassWindow(settings.class_window, self.prior)
        self.cutoff = g_cutoff(settings.alpha, len(prior))
        self.link_cutoff = g_cutoff(settings.link_alpha, len(prior))
        self.armed = {"global_ood": True, "cohort_ood": True, "cohort_classes": True, "cohort_steps": True}
        self.linked_keys: set[str] = set()

    def observe(
        self,
        principal: str,
        young: bool,
        flags: np.ndarray,
        classes: np.ndarray,
        now: float,
        prior: Optional[np.ndarray] = None,
        steps: tuple[int, int] = (0, 0),
    ) -> list[dict]:
        """One answered request; `prior`: the key's declared class shares (floored), which its class histogram is
        tested against, and which keep its classes out of the young cohort's histogram; `steps`: of a young key's
        request, the step distances measured and those under the radius."""
        width = self.s.window / BUCKETS
        if not self.buckets or now >= self.buckets[-1].start + width:
            self.buckets.append(Bucket(now, principals=set()))
        bucket, n, ood = self.buckets[-1], len(classes), int(flags.sum())
        self._add(bucket, n, ood, young, +1)
        bucket.steps_n, bucket.steps_k = bucket.steps_n + steps[0], bucket.steps_k + steps[1]
        self.steps_n, self.steps_k = self.steps_n + steps[0], self.steps_k + steps[1]
        if principal not in bucket.principals:
            bucket.principals.add(principal)
            self.per[principal] += 1
        if young and prior is None:
            for c in classes:
                self.young_classes.add(int(c))
        while self.buckets and self.buckets[0].start + width < now - self.s.window:
            old = self.buckets.popleft()
            self._add(old, old.n, old.ood, False, -1)
            self.young_n -= old.young_n
            self.young_ood -= old.young_ood
            self.steps_n -= old.steps_n
            self.steps_k -= old.steps_k
            for name in old.principals:
                self.per[name] -= 1
                if self.per[name] == 0:
                    del self.per[name]
        alerts: list[dict] = []
        if self.n:  # a request of near-duplicates alone adds nothing to an otherwise empty window
            tail = binomial_tail(self.ood, self.n, self.q)
            self._judge(alerts, "global_ood", self.ood / self.n, tail < self.s.alpha, images=self.n, tail=tail)
        if self.young_n >= self.s.min_images:
            tail = binomial_tail(self.young_ood, self.young_n, self.q)
            self._judge(
                alerts, "cohort_ood", self.young_ood / self.young_n, tail < self.s.alpha, images=self.young_n, tail=tail
            )
            g = self.young_classes.g()
            self._judge(alerts, "cohort_classes", g, g > self.cutoff, images=int(self.young_classes.counts.sum()), g=g)
        if self.steps_n >= self.s.min_images:
            tail = binomial_tail(self.steps_k, self.steps_n, self.q)
            share = self.steps_k / self.steps_n
            self._judge(alerts, "cohort_steps", share, tail < self.s.alpha, images=self.steps_n, tail=tail)
        active = [signal for signal, armed in self.armed.items() if not armed]
        signal = None
        if active and not alerts and principal not in self.linked_keys:
            signal = next((name for name in active if self._stands_out(principal, name)), None)
        if signal is not None:
            self.linked_keys.add(principal)
            alerts.append(
                dict(signal=signal, value=0.0, threshold=0.0, queries=0, details={}, linked=[principal], continued=True)
            )
        return alerts

    def _add(self, bucket: Bucket, n: int, ood: int, young: bool, sign: int) -> None:
        """Counts into (sign +1, the bucket too) or out of (-1) the window's totals."""
        self.n += sign * n
        self.ood += sign * ood
        if sign > 0:
            bucket.n += n
            bucket.ood += ood
            if young:
                bucket.young_n += n
                bucket.young_ood += ood
                self.young_n += n
                self.young_ood += ood

    def _stands_out(self, name: str, signal: str) -> bool:
        return self.stands_out(name, signal.startswith("cohort")) if self.stands_out is not None else False

    def _judge(self, alerts: list[dict], signal: str, value: float, crossed: bool, **details) -> None:
        if crossed and self.armed[signal]:
            threshold = self.cutoff if signal == "cohort_classes" else self.s.alpha
            linked = sorted(name for name in self.per if self._stands_out(name, signal))
            self.linked_keys.update(linked)
            alerts.append(
                dict(
                    signal=signal,
                    value=float(value),
                    threshold=float(threshold),
                    queries=int(details["images"]),
                    details={**{k: float(v) for k, v in details.items()}, "window_seconds": self.s.window},
                    linked=linked,
                )
            )
        self.armed[signal] = not crossed
        if all(self.armed.values()):
            self.linked_keys.clear()  # every signal back below: a later campaign links its keys afresh

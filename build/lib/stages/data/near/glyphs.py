"""`glyphs` and `latin-letters`: characters rendered from the fonts matplotlib ships, jittered like handwriting
scans and framed as MNIST. glyphs draws non-Latin scripts and symbol sets (label: the script or set) with every
Latin letter, digit and homoglyph of one removed by measurement; latin-letters (label: the letter) is for evaluation.
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features

from stages.data.near import _frame

# The Unicode text fonts of matplotlib's mpl-data/fonts/ttf. Left out: DejaVu*Display (a subset for big sizes),
# LastResort (placeholder boxes), STIXNonUni and STIXSiz* (private-use code points), the cm* Computer Modern fonts
# (TeX encodings: their code points do not name the characters they draw).
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)
RENDER_SIZE = 64  # font size in pixels: about 2.5 times the 20-pixel box, so jitter acts on a finer grid

# The classes of glyphs: a script's letters or a symbol set's members, as the Unicode characters in these ranges
# whose general category starts with the given prefix (modifier letters, Lm, excepted: they are small marks).
CLASSES = {
    "greek": ([(0x0370, 0x03FF)], "L"),
    "cyrillic": ([(0x0400, 0x04FF)], "L"),
    "armenian": ([(0x0531, 0x0587)], "L"),
    "georgian": ([(0x10A0, 0x10FF)], "L"),
    "hebrew": ([(0x05D0, 0x05EA)], "L"),
    "arabic": ([(0x0621, 0x064A)], "L"),
    "canadian-syllabics": ([(0x1400, 0x167F)], "L"),
    "math": ([(0x0021, 0x00FF), (0x2200, 0x22FF), (0x27C0, 0x27EF), (0x2A00, 0x2AFF)], "Sm"),
    "arrows": ([(0x2190, 0x21FF), (0x27F0, 0x27FF), (0x2900, 0x297F)], "S"),
    "punctuation": ([(0x0021, 0x00BF), (0x2010, 0x205E)], "P"),
    "currency": ([(0x0021, 0x00FF), (0x20A0, 0x20CF)], "Sc"),
}
LATIN = string.ascii_uppercase + string.ascii_lowercase
REFERENCES = LATIN + string.digits

# Jitter of a scan of handwriting, applied to each rendering.
ROTATE_DEG, SHEAR, STRETCH = 15.0, 0.3, 0.15
STROKES = (
    (ImageFilter.MinFilter(3), 0.15),
    (None, 0.35),
    (ImageFilter.MaxFilter(3), 0.35),
    (ImageFilter.MaxFilter(5), 0.15),
)  # thinner, as drawn, bolder, much bolder
BLUR_RADIUS = 1.5  # upper bound, in rendering pixels (0.6 pixel once framed)
SHIFTS = ((-1, 0.2), (0, 0.6), (1, 0.2))  # pixels, per axis, off the centre of mass

# A glyph is a homoglyph when its MNIST-framed rendering correlates (Pearson, over the 28 x 28 pixels) above
# HOMOGLYPH_THRESHOLD with a Latin letter or digit of the same font, upright or turned by up to the jitter's
# rotation (after which a / is an l); its character is then removed in every font. Measured over the 1,935
# candidate characters (each one's highest correlation in any font): Cyrillic А В Е К М Н О Р С Т Х З а е о р с х
# and Greek Α Β Ε Ζ Η Ι Κ Μ Ν Ο Ρ Τ Χ ο reach 0.99 or more, б and / 0.94 (as 6 and l); between 0.8 and 0.9 lie more
# look-alikes (ε 0.89 as e, κ к τ 0.88 as K and T, ν 0.86 as v, χ ҳ 0.85 as X, Ӧ 0.84, ь 0.81 as b) beside shapes
# that only share strokes with one (€ 0.89, Я 0.88, ↑ 0.84); below 0.8 look-alikes thin out (Д 0.78, λ 0.75,
# ∞ 0.71, ← 0.59). 0.8 removes 567 characters; the rules of `_removed` 100 more (93 marked variants and
# decompositions, 7 ligatures): 1,268 remain.
HOMOGLYPH_THRESHOLD = 0.8
REFERENCE_ANGLES = (-ROTATE_DEG, -ROTATE_DEG / 2, 0.0, ROTATE_DEG / 2, ROTATE_DEG)
# Characters the fonts draw as strings of Latin letters (or of their homoglyphs) without a Unicode decomposition
# saying so: CE, Pts, Dp, the Cyrillic digraph uk drawn as Оу and the ligature a-ie drawn as Æ.
LIGATURES = "₠₧₯ѸѹӔӕ"
TEST_FRACTION = 0.2  # glyphs: this share of each class's characters is drawn only into the test split


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_paths() -> list[Path]:
    return [font_dir() / name for name in FONT_FILES]


@lru_cache(maxsize=None)
def _font(path: str) -> ImageFont.FreeTypeFont:
    # The basic layout engine: raqm (where installed) would shape text and make renderings differ between machines.
    return ImageFont.truetype(path, RENDER_SIZE, layout_engine=ImageFont.Layout.BASIC)


@lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


def render(path: Path, char: str) -> np.ndarray | None:
    """The character drawn white on black, cropped to its ink, as float32 in [0, 1]; None if it draws nothing."""
    font = _font(str(path))
    canvas = Image.new("L", (4 * RENDER_SIZE, 4 * RENDER_SIZE))
    ImageDraw.Draw(canvas).text((2 * RENDER_SIZE, 2 * RENDER_SIZE), char, font=font, fill=255, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return None
    return np.asarray(canvas.crop(box), np.float32) / 255.0


def _members(ranges: list[tuple[int, int]], category: str) -> list[str]:
    chars = []
    for low, high in ranges:
        for code in range(low, high + 1):
            found = unicodedata.category(chr(code))
            if found.startswith(category) and found != "Lm" and chr(code) not in REFERENCES:
                chars.append(chr(code))
    return chars


def _variant_of(char: str) -> str | None:
    """The letter a character is a marked variant of, by its Unicode name: CYRILLIC CAPITAL LETTER A WITH
    DIAERESIS -> CYRILLIC CAPITAL LETTER A, EM WITH TAIL -> EM; None if it is no such variant."""
    name = unicodedata.name(char, "")
    if " WITH " not in name:
        return None
    try:
        return unicodedata.lookup(name.split(" WITH ")[0])
    except KeyError:
        return None


def _removed(chars: list[str], scores: np.ndarray) -> list[str]:
    """Homoglyphs: characters measured above the threshold in some font, the marked variants of those (Ӓ is А
    with a diaeresis, by decomposition; Ӎ is М with a tail, by name), characters whose compatibility decomposition
    holds a Latin letter or digit (₨ is Rs), and LIGATURES."""
    measured = {c for c, s in zip(chars, scores, strict=False) if s > HOMOGLYPH_THRESHOLD}
    removed = set(measured) | set(LIGATURES)
    for char in set(chars):
        bases = {_variant_of(char), unicodedata.normalize("NFD", char)[0]} - {char}
        if bases & (measured | set(REFERENCES)):
            removed.add(char)
        if any(c in REFERENCES for c in unicodedata.normalize("NFKD", char)):
            removed.add(char)
    return sorted(removed & set(chars))


@dataclass
class Bank:
    classes: list[str]
    chars: list[str]  # one per glyph
    labels: np.ndarray  # class of each glyph
    fonts: np.ndarray  # index into FONT_FILES of each glyph
    masks: list[np.ndarray]  # rendering of each glyph (see `render`)
    removed: list[str]  # homoglyphs removed (characters)


def _framed(mask: np.ndarray) -> np.ndarray:
    """The clean MNIST framing: the view in which homoglyphs are measured."""
    return _frame.mnist_like(mask).astype(np.float32)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of a with every row of b (flattened images)."""
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
    b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-12
    return a @ b.T


def _references(path: Path) -> np.ndarray:
    """Latin letters and digits of one font, framed, each upright and turned within the jitter's rotation range."""
    framed = []
    for char in REFERENCES:
        mask = render(path, char) if ord(char) in _charmap(str(path)) else None
        if mask is None:
            continue
        image = Image.fromarray(np.round(mask * 255).astype(np.uint8), "L")
        for angle in REFERENCE_ANGLES:
            turned = image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
            framed.append(_framed(np.asarray(turned, np.float32) / 255.0))
    return np.stack(framed)


def homoglyph_scores(chars: list[str], fonts: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """Per glyph, the highest correlation with a Latin letter or digit of its own font (upright or turned)."""
    scores = np.zeros(len(chars))
    framed = np.stack([_framed(m) for m in masks]) if masks else np.zeros((0, 28, 28))
    for f in np.unique(fonts):
        refs = _references(font_paths()[f])
        rows = np.flatnonzero(fonts == f)
        scores[rows] = _correlation(framed[rows], refs).max(1)
    return scores


@lru_cache(maxsize=2)
def glyph_bank(latin: bool = False) -> Bank:
    """Every (character, font) pair the fonts draw: Latin letters (latin=True), or the scripts and symbol sets less
    the characters that are homoglyphs in some font."""
    if latin:
        groups = {c: [c] for c in LATIN}
    else:
        groups, seen = {}, set()
        for name, (ranges, category) in CLASSES.items():
            groups[name] = [c for c in _members(ranges, category) if c not in seen]
            seen.update(groups[name])
    chars, labels, fonts, masks = [], [], [], []
    for f, path in enumerate(font_paths()):
        cmap = _charmap(str(path))
        for label, members in enumerate(groups.values()):
            for char in members:
                if ord(char) in cmap:
                    mask = render(path, char)
                    if mask is None or mask.max() <= 0.5:  # a glyph of only faint pixels is a placeholder
                        continue
                    chars.append(char)
                    labels.append(label)
                    fonts.append(f)
                    masks.append(mask)
    fonts_arr, removed = np.asarray(fonts), []
    if not latin:
        removed = _removed(chars, homoglyph_scores(chars, fonts_arr, masks))
        keep = [i for i, c in enumerate(chars) if c not in set(removed)]
        chars, labels, masks = [chars[i] for i in keep], [labels[i] for i in keep], [masks[i] for i in keep]
        fonts_arr = fonts_arr[keep]
    return Bank(list(groups), chars, np.asarray(labels), fonts_arr, masks, removed)


def jitter(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One handwriting-scan-like rendering: slant, shear and proportions, stroke width, blur, position."""
    image = Image.fromarray(np.round(mask * 255).astype(np.uint8), "L")
    image = _frame.warp(image, _frame.jitter_affine(rng, ROTATE_DEG, SHEAR, STRETCH))
    stroke = STROKES[rng.choice(len(STROKES), p=[p for _, p in STROKES])][0]
    if stroke is not None:
        image = image.filter(stroke)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, BLUR_RADIUS)))
    out = np.asarray(image, np.float32) / 255.0
    if _frame.blank(out):  # thinning erased a hairline glyph: keep it as drawn
        out = mask
    shifts, weights = zip(*SHIFTS, strict=False)
    return _frame.mnist_like(out, tuple(rng.choice(shifts, 2, p=weights)))


def draw(bank: Bank, members: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n jittered images: a class uniformly, then one of its glyphs (among `members`, indices into the bank)."""
    by_class = [members[bank.labels[members] == k] for k in range(len(bank.classes))]
    by_class = [(k, m) for k, m in enumerate(by_class) if len(m)]
    labels = np.asarray([by_class[i][0] for i in rng.integers(len(by_class), size=n)])
    lookup = dict(by_class)
    images = np.empty((n, 1, 28, 28), np.uint8)
    for i, label in enumerate(labels):
        images[i, 0] = jitter(bank.masks[rng.choice(lookup[label])], rng)
    return images, labels


def _split_chars(bank: Bank, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Glyph indices of the train and test splits: each class's characters divided TEST_FRACTION to test."""
    test_chars = set()
    for k in range(len(bank.classes)):
        chars = sorted({c for c, label in zip(bank.chars, bank.labels, strict=False) if label == k})
        picked = rng.permutation(len(chars))[: max(1, round(TEST_FRACTION * len(chars)))]
        test_chars.update(chars[i] for i in picked)
    is_test = np.asarray([c in test_chars for c in bank.chars])
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def renderer() -> str:
    """What the pixels depend on besides the fonts (whose paths and sha256 are the artifact's inputs)."""
    import matplotlib
    import PIL

    return (
        f"Pillow {PIL.__version__} (FreeType {features.version('freetype2')}, basic layout), fonts of "
        f"matplotlib {matplotlib.__version__}"
    )


def _describe(what: str) -> str:
    return (
        f"{what} rendered from matplotlib's fonts, jittered like handwriting scans (rotation +-{ROTATE_DEG:g} deg, "
        f"shear +-{SHEAR:g}, aspect exp(+-{STRETCH:g}), stroke width, Gaussian blur up to {BLUR_RADIUS:g} px, "
        "shift +-1 px) and framed as MNIST"
    )


def load_glyphs(name: str, seed: int, n_train: int, n_test: int, **_):
    from stages.data.raw import raw_dataset as _raw

    bank = glyph_bank()
    train_ids, test_ids = _split_chars(bank, np.random.default_rng(seed))
    train_x, train_y = draw(bank, train_ids, n_train, np.random.default_rng([seed, 1]))
    test_x, test_y = draw(bank, test_ids, n_test, np.random.default_rng([seed, 2]))
    raw = _raw(name, train_x, train_y, test_x, test_y, bank.classes, font_paths())
    raw.attrs.update(
        generator=_describe("characters of non-Latin scripts and symbol sets (label: the script or set)")
        + f"; Latin letters, digits and their homoglyphs removed (correlation > {HOMOGLYPH_THRESHOLD:g} in some font, "
        f"marked variants, decompositions, ligatures); {TEST_FRACTION:.0%} of each class's characters only in test",
        homoglyph_threshold=HOMOGLYPH_THRESHOLD,
        homoglyphs_removed="".join(bank.removed),
        characters=len(set(bank.chars)),
        glyphs=len(bank.chars),
        renderer=renderer(),
    )
    return raw


def load_latin_letters(name: str, seed: int, n_train: int, n_test: int, **_):
    """The 52 letters in every font; train and test differ in their jitter only (there are too few letters to
    hold some out)."""
    from stages.data.raw import raw_dataset as _raw

    bank = glyph_bank(latin=True)
    every = np.arange(len(bank.chars))
    train_x, train_y = draw(bank, every, n_train, np.random.default_rng([seed, 1]))
    test_x, test_y = draw(bank, every, n_test, np.random.default_rng([seed, 2]))
    raw = _raw(name, train_x, train_y, test_x, test_y, bank.classes, font_paths())
    raw.attrs.update(
        generator=_describe("Latin letters A-Z and a-z (label: the letter)") + "; for evaluation only",
        characters=len(set(bank.chars)),
        glyphs=len(bank.chars),
        renderer=renderer(),
    )
    return raw

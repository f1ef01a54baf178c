"""Rendered characters as an offline many-class image source: one class per character, drawn in many fonts.

Why: the paper's regime is a base pretrained on a broad, many-class source and then transferred
(ImageNet-21k -> CIFAR-100). Debian's font packages give such a source offline, with no download at run time.

- Fonts (:func:`font_files`): every file of the pinned Debian packages in ``FONT_GROUPS`` but the
  ``EXCLUDED_FONTS``, sorted by path, so the result does not depend on the order the OS lists them. A missing
  package raises ``FileNotFoundError`` naming it.
- Classes (:func:`class_sets`): the characters of ``RANGES``, in three sets: ``pretrain`` (Latin, Greek, digits,
  punctuation and symbols), ``near`` (Cyrillic letters: a related script, held out) and ``far`` (Hebrew letters:
  a script family not seen at all). A character is kept when the ``REFERENCE_FONTS`` and at least
  ``MIN_FONTS`` fonts of the pool have it, and dropped when its 28 px renderings are within ``MIN_DIFFERENCE``
  of a character kept before it: homoglyphs (Latin A, Greek Alpha, Cyrillic A) and differences too small to
  see at 28 px (most accents on capitals) make one class, not two.
- Images (:func:`render`): a character in one of its fonts, white on black, ``[28, 28]`` uint8, drawn at 4x
  and reduced by area averaging, with a random affine jitter (rotation, shear, scale, shift), a stroke-width
  change, contrast and Gaussian noise. :func:`render_set` draws image ``i`` of a character from
  ``numpy.random.default_rng([seed, split, codepoint, i])``, so an image depends on those four numbers only
  (and on Pillow and the fonts, which ``tests/test_glyphs.py`` pins with checksums); train and test images
  come from different streams.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 28
SCALE = 4  # drawn at SIZE * SCALE, then reduced
FONT_ROOT = Path("/usr/share/fonts")
#: (folder under FONT_ROOT, file pattern, number of files, the Debian packages that install them).
FONT_GROUPS = [
    ("truetype/dejavu", "DejaVu*.ttf", 22, "fonts-dejavu-core=2.37-6 fonts-dejavu-extra=2.37-6"),
    ("truetype/freefont", "Free*.ttf", 12, "fonts-freefont-ttf=20120503-10"),
    ("truetype/liberation2", "Liberation*.ttf", 12, "fonts-liberation2=2.1.5-1"),
    ("truetype/croscore", "*.ttf", 12, "fonts-croscore=20201225-1"),
    ("truetype/cmu", "cmun*.ttf", 33, "fonts-cmu=0.7.0-5"),
    ("opentype/linux-libertine", "Lin*.otf", 13, "fonts-linuxlibertine=5.3.0-6"),
    ("truetype/fonts-oldstandard", "OldStandard-*.ttf", 3, "fonts-oldstandard=2.2really-4"),
    ("opentype/jura", "Jura-*.otf", 5, "fonts-jura=5.103-3"),
    ("opentype/urw-base35", "*.otf", 35, "fonts-urw-base35=20200910-7"),
    ("truetype/culmus", "*.[ot]tf", 36, "culmus=0.133-1"),
]
#: Fonts whose character map does not say what they draw: keycaps, dingbats, and Symbol ("g" is a gamma).
EXCLUDED_FONTS = {"LinBiolinum_K.otf", "D050000L.otf", "StandardSymbolsPS.otf"}
#: Every class is in these fonts; its renderings in them decide which characters look the same.
REFERENCE_FONTS = ["truetype/dejavu/DejaVuSans.ttf", "truetype/freefont/FreeSans.ttf",
                   "truetype/freefont/FreeSerif.ttf", "truetype/freefont/FreeMono.ttf"]
MIN_FONTS = 16
#: Squared difference of two characters' 28 px renderings (pixels in [0, 1], mean over the reference fonts)
#: below which they count as one class: about four fully lit pixels, what tells accents apart on small letters
#: but often not the accents squeezed onto capitals, nor "l" from "I" (the same glyph in most sans-serifs).
MIN_DIFFERENCE = 4.0
RANGES = {
    "pretrain": [(0x21, 0x7E), (0xA1, 0x24F), (0x250, 0x2AF), (0x370, 0x3FF), (0x1E00, 0x1EFF), (0x2010, 0x205E),
                 (0x20A0, 0x20BF), (0x2100, 0x218B), (0x2190, 0x22FF), (0x25A0, 0x25FF)],
    "near": [(0x400, 0x45F)],
    "far": [(0x5D0, 0x5EA)],
}
#: Unicode categories a set takes (first letter): letters, numbers, punctuation, symbols; never marks or spaces.
CATEGORIES = {"pretrain": "LNPS", "near": "L", "far": "L"}
SPLITS = {"train": 0, "test": 1}
#: Images per class in each split of a set, as served by :func:`load_set` (the data sources ``glyphs-<set>``).
IMAGES_PER_CLASS = {"pretrain": {"train": 200, "test": 10}, "near": {"train": 200, "test": 100},
                    "far": {"train": 200, "test": 100}}


@cache
def font_files() -> tuple[Path, ...]:
    """Every font file of the pool, sorted by path; raises when a package's files are missing."""
    files: list[Path] = []
    for folder, pattern, count, packages in FONT_GROUPS:
        found = sorted((FONT_ROOT / folder).glob(pattern))
        if len(found) != count:
            raise FileNotFoundError(
                f"expected {count} font files {FONT_ROOT / folder / pattern}, found {len(found)}: install them "
                f"with `apt-get install -y {packages}` (or run .ci/setup)")
        files += [f for f in found if f.name not in EXCLUDED_FONTS]
    return tuple(sorted(files))


@cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


@cache
def _cmap(path: Path) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(str(path), lazy=True) as f:
        return frozenset(f["cmap"].getBestCmap())


def _em(side: int) -> int:
    return round(0.85 * side)


def _has_ink(char: str, font: Path) -> bool:
    x0, y0, x1, y1 = _font(font, _em(SIZE * SCALE)).getbbox(char, anchor="ls")
    return x1 > x0 and y1 > y0


@cache
def fonts_for(char: str) -> tuple[Path, ...]:
    """The pool's fonts that map ``char`` to a glyph with ink, sorted by path."""
    return tuple(f for f in font_files() if ord(char) in _cmap(f) and _has_ink(char, f))


def _draw(char: str, font: Path, stroke: int = 0) -> Image.Image:
    """``char`` at 4x on a black square: one em is 85% of the side, the baseline at 72% of the height.
    ``stroke`` > 0 thickens the strokes by that many pixels, < 0 thins them (unless that erases most ink)."""
    side = SIZE * SCALE
    img = Image.new("L", (side, side), 0)
    ImageDraw.Draw(img).text((side / 2, 0.72 * side), char, fill=255, font=_font(font, _em(side)), anchor="ms",
                             stroke_width=max(stroke, 0), stroke_fill=255)
    if stroke < 0:
        thin = img.filter(ImageFilter.MinFilter(1 - 2 * stroke))
        if np.asarray(thin).sum() > 0.4 * np.asarray(img).sum():
            img = thin
    return img


def _affine(img: Image.Image, angle: float = 0.0, shear: float = 0.0, scale: tuple[float, float] = (1.0, 1.0),
            shift: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Rotate (degrees), shear and scale about the centre, then shift (pixels); all of it shrunk about the
    centre when the ink would come closer than one output pixel to an edge."""
    side = img.width
    c = side / 2
    rad = math.radians(angle)
    rot = np.array([[math.cos(rad), -math.sin(rad)], [math.sin(rad), math.cos(rad)]])
    a = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(scale)
    t = np.asarray(shift, dtype=float)
    box = img.getbbox()
    if box is not None:
        corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[0], box[3]], [box[2], box[3]]]) - c
        reach = np.abs(corners @ a.T + t).max()
        if reach > c - SCALE:
            a, t = a * ((c - SCALE) / reach), t * ((c - SCALE) / reach)
    inv = np.linalg.inv(a)
    off = c - inv @ (c + t)  # input point = inv @ output point + off
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)


def _reduce(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32) / 255.0


def canonical(char: str, font: Path) -> np.ndarray:
    """``char`` in ``font`` with no jitter: ``[28, 28]`` float32 in [0, 1]."""
    return _reduce(_affine(_draw(char, font)))


def render(char: str, fonts: Sequence[Path], rng: np.random.Generator) -> np.ndarray:
    """One jittered image of ``char`` in a random font of ``fonts``: ``[28, 28]`` uint8, white on black."""
    font = fonts[int(rng.integers(len(fonts)))]
    stroke = int(rng.integers(-2, 4))
    angle, shear, size = rng.uniform(-12, 12), rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.1)
    scale = (size * rng.uniform(0.88, 1.12), size)
    shift = tuple(rng.uniform(-2.5, 2.5, size=2) * SCALE)
    glyph = _reduce(_affine(_draw(char, font, stroke), angle, shear, scale, shift))
    ink, background, noise = rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.08)
    img = background + (ink - background) * glyph + noise * rng.standard_normal(glyph.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _candidates(name: str) -> list[str]:
    """The characters of set ``name`` in the reference fonts and in at least ``MIN_FONTS`` fonts."""
    refs = [FONT_ROOT / r for r in REFERENCE_FONTS]
    out = []
    for lo, hi in RANGES[name]:
        for ch in map(chr, range(lo, hi + 1)):
            if (unicodedata.category(ch)[0] in CATEGORIES[name] and all(ord(ch) in _cmap(r) for r in refs)
                    and len(fonts_for(ch)) >= MIN_FONTS):
                out.append(ch)
    return out


@cache
def class_sets() -> dict[str, tuple[str, ...]]:
    """The characters of each set (``pretrain``, ``near``, ``far``), in code point order.

    A candidate is dropped when its reference renderings are within ``MIN_DIFFERENCE`` of a character kept
    before it, in its own set or an earlier one.
    """
    refs = [FONT_ROOT / r for r in REFERENCE_FONTS]
    candidates = {name: _candidates(name) for name in RANGES}
    kept = np.empty((sum(map(len, candidates.values())), len(refs) * SIZE * SIZE), dtype=np.float32)
    n = 0
    sets: dict[str, tuple[str, ...]] = {}
    for name, chars in candidates.items():
        sets[name] = ()
        for ch in chars:
            v = np.concatenate([canonical(ch, r).ravel() for r in refs])
            if n and ((kept[:n] - v) ** 2).sum(1).min() / len(refs) < MIN_DIFFERENCE:
                continue
            kept[n], n = v, n + 1
            sets[name] += (ch,)
    return sets


def render_set(chars: Sequence[str], per_class: int, split: str = "train",
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every character, class by class: images ``[C * per_class, 28, 28]`` uint8 and
    labels ``[C * per_class]`` (the index in ``chars``)."""
    images = np.empty((len(chars) * per_class, SIZE, SIZE), dtype=np.uint8)
    for c, ch in enumerate(chars):
        fonts = fonts_for(ch)
        for i in range(per_class):
            images[c * per_class + i] = render(ch, fonts, np.random.default_rng([seed, SPLITS[split], ord(ch), i]))
    return images, np.repeat(np.arange(len(chars), dtype=np.int64), per_class)


@cache
def load_set(name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Split ``split`` of set ``name``: images ``[N, 28, 28]`` uint8, labels ``[N]`` and the class names (the
    characters), with ``IMAGES_PER_CLASS`` images per class, seed 0. Rendered once per process."""
    if name not in RANGES:
        raise ValueError(f"unknown glyph set {name!r}: use one of {list(RANGES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {list(SPLITS)}")
    chars = class_sets()[name]
    images, labels = render_set(chars, IMAGES_PER_CLASS[name][split], split)
    images.flags.writeable = False
    return images, labels, chars

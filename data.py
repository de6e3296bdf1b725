"""What goes in: tokenizer, the synthetic shapes world, file datasets, image transforms, multi-source sampling.

FLAVA (arXiv 2112.04482, §3.4) draws each update from one source: image-text pairs, images alone or
text alone (0.70 / 0.15 / 0.15). Each source exists twice here: in an embedded synthetic world
(captioned scenes of coloured shapes, deterministic, no downloads) and as files on disk (a JSONL/CSV
manifest of pairs, an image folder tree, a text file). Images come out as uint8 (3, H, W): the model
step normalises them (CLIP_MEAN / CLIP_STD) and computes its dVAE targets itself. Transforms follow
FLAVA's public code: random-resized crop, scale (0.9, 1.0), for training; resize + centre crop for eval.

    python data.py                      # draws 64 scenes to shapes_world.png and prints captions
    python -m pytest tests/test_data.py
"""
import bisect
import collections
import csv
import functools
import json
import math
import os
import random
import re
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP (arXiv 2103.00020) pixel statistics, which FLAVA uses
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SOURCES = ("pairs", "images", "texts")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # in the order of Tokenizer.special_ids
MAX_SKIPS = 50  # consecutive unreadable files before a dataset gives up
# BERT's basic tokenizer (uncased), whose ids a BERT vocab.txt expects: control and format characters
# (Unicode C*, e.g. U+200B) deleted, white space split, CJK ideographs one word each, lower case, accents
# stripped, and every punctuation character (Unicode P*, and every ASCII symbol) a word of its own.
_ASCII_WORD = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
_ASCII_CONTROLS = {c: None for c in (*range(32), 127) if chr(c) not in "\t\n\r"}  # str.translate deletes them
_SPLIT_CONTROLS = dict.fromkeys(map(ord, "\x0b\x0c\x1c\x1d\x1e\x1f\x85"))  # deleted by BERT, split on by str.split
_CJK = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2CEAF),
        (0x2F800, 0x2FA1F))  # the code point ranges of BERT's _is_chinese_char


def _strip_accents(word):
    """BERT uncased: NFD, then drop the combining marks ("café" -> "cafe")."""
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def _words(text):
    """The words of BERT's basic tokenizer, lazily (a 25,000-character line need not be split whole)."""
    if text.isascii():  # the common case, at C speed: the same rules restricted to ASCII
        yield from (m.group() for m in _ASCII_WORD.finditer(text.translate(_ASCII_CONTROLS).lower()))
        return
    for chunk in text.translate(_SPLIT_CONTROLS).split():  # str.split(): every Unicode space, as BERT's
        yield from _chunk_words(chunk)


@functools.lru_cache(maxsize=1 << 16)
def _chunk_words(chunk):
    """BERT's rules within a run of non-space characters (cached: text repeats its words)."""
    kept, words = [], []
    for c in chunk:
        if unicodedata.category(c)[0] != "C" and c != "\ufffd":  # control, format, private, unassigned: deleted
            kept += (" ", c, " ") if any(lo <= ord(c) <= hi for lo, hi in _CJK) else (c,)
    for token in "".join(kept).split():  # (BERT's NFC here changes nothing: _strip_accents' NFD undoes it)
        word = ""
        for c in _strip_accents(token.lower()):
            if c.isascii() and not c.isalnum() or unicodedata.category(c)[0] == "P":
                words += (word, c) if word else (c,)
                word = ""
            else:
                word += c
        words += (word,) if word else ()
    return tuple(words)


# -----------------------------------------------------------------------------
# Tokenizer: BERT's WordPiece (arXiv 1810.04805), written out


class Tokenizer:
    """WordPiece-style, hand-written. Specials [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 when built here;
    when loaded from a BERT vocab.txt the specials are found by their strings (BERT: 0,100,101,102,103)."""

    def __init__(self, vocab):
        self.vocab = list(vocab)  # what a checkpoint stores
        self.index = {t: i for i, t in reversed(list(enumerate(self.vocab)))}  # a duplicate's first id wins
        missing = [s for s in SPECIALS if s not in self.index]
        if missing:
            raise ValueError(f"vocabulary ({len(self.vocab)} tokens) lacks the special tokens {missing}")
        self.special_ids = tuple(self.index[s] for s in SPECIALS)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = self.special_ids
        self._cache = {}  # raw word -> piece ids: text repeats its words, so tokenising is mostly lookups

    @classmethod
    def from_corpus(cls, texts, vocab_size=4096):
        """Every character seen (word-initial and '##'), then frequent words, then frequent '##' suffixes.
        Characters are all kept, even past vocab_size, so text of seen characters never has an [UNK]."""
        counts = collections.Counter(w for text in texts for w in _words(text))
        chars = sorted({c for w in counts for c in w})
        vocab = [*SPECIALS, *chars, *("##" + c for c in chars)]
        room = max(0, vocab_size - len(vocab))
        ranked = lambda counter: sorted(counter, key=lambda k: (-counter[k], k))  # noqa: E731 (deterministic)
        words = [w for w in ranked(counts) if len(w) > 1]
        kept = words[: room - room // 4]  # a quarter of the room for suffixes of the words left out
        suffixes = collections.Counter()
        for w in words[len(kept):]:
            for i in range(1, len(w) - 1):
                suffixes["##" + w[i:]] += counts[w]
        pieces = [p for p in ranked(suffixes) if suffixes[p] > 1][: room - len(kept)]
        kept += words[len(kept): room - len(pieces)]
        return cls(vocab + kept + pieces)

    @classmethod
    def from_vocab_file(cls, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        vocab = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): tokens may be odd characters
        try:
            return cls([t.rstrip("\r") for t in (vocab[:-1] if vocab[-1] == "" else vocab)])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path):
        Path(path).write_text("".join(t + "\n" for t in self.vocab), encoding="utf-8")

    def __len__(self):
        return len(self.vocab)

    def _word_ids(self, raw):
        ids = self._cache.get(raw)
        if ids is None:
            word, ids, start = raw, [], 0
            if len(word) > 100:  # BERT's limit; it also keeps the quadratic matching below cheap
                word, ids = "", [self.unk_id]
            while start < len(word):  # greedy longest match first; continuations carry '##'
                for end in range(len(word), start, -1):
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.index:
                        ids.append(self.index[piece])
                        break
                else:
                    ids = [self.unk_id]  # one unmatchable character makes the whole word unknown, as in BERT
                    break
                start = end
            if len(self._cache) < 1 << 20:  # bounded, so a huge corpus cannot grow it forever
                self._cache[raw] = ids
        return ids

    def encode(self, texts, length):
        """[CLS] pieces [SEP] [PAD]...: ids (B, L) long and attn (B, L) bool, True on real tokens."""
        assert length >= 2, "room for [CLS] and [SEP] is needed"
        rows = []
        for text in [texts] if isinstance(texts, str) else texts:
            pieces = [self.cls_id]
            for word in _words(text):  # lazy: a 25,000-character line stops early
                pieces += self._word_ids(word)
                if len(pieces) >= length - 1:
                    break
            rows.append(pieces[: length - 1] + [self.sep_id])  # truncation keeps [SEP]
        ids = torch.tensor([row + [self.pad_id] * (length - len(row)) for row in rows]).reshape(-1, length)  # (B, L)
        return ids, ids != self.pad_id  # (B, L): lower-cased text can never spell "[PAD]", so this is exact

    def decode(self, ids):
        tokens = [self.vocab[i] for i in (ids.tolist() if torch.is_tensor(ids) else ids) if i not in self.special_ids]
        return " ".join(tokens).replace(" ##", "")  # a '##' piece continues the word before it


# -----------------------------------------------------------------------------
# The shapes world: the embedded default


class ShapesWorld:
    """The embedded default: captioned scenes generated deterministically from (seed, split, index)."""

    # Four shapes that stay distinct at 64 px (a five-pointed star was also here: next to the cross at
    # small sizes it held zero-shot accuracy ~0.2 lower for the same training; see README, "Tuning").
    SHAPES = ("circle", "square", "triangle", "cross")
    COLOURS = ("red", "green", "blue", "yellow", "purple", "brown")  # consonant-initial: the article is "a"
    RGB = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (150, 60, 200), "brown": (125, 75, 30)}
    SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",),
                   "cross": ("cross", "plus")}
    SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
    RADIUS = {"small": (0.14, 0.17), "large": (0.21, 0.26)}  # fraction of the image side, a gap between
    PREFIXES = ("", "a picture of", "an image of", "there is", "a photo of")
    RELATIONS = ("to the left of", "to the right of", "above", "below")
    QUESTION_WORDS = "how many objects are there what colour is the which shape yes no ?"
    prompt_templates = ("a {}.", "a photo of a {}.", "a picture of a {}.", "an image of a {}.",
                        "there is a {}.", "a small {}.", "a large {}.")

    def __init__(self, image_size=64, seed=0, held_out=(("red", "triangle"), ("blue", "cross"), ("green", "circle")),
                 max_objects=3):
        self.image_size, self.seed, self.max_objects = image_size, seed, max_objects
        self.held_out = tuple(tuple(pair) for pair in held_out)
        every = [(c, s) for c in self.COLOURS for s in self.SHAPES]
        if not set(self.held_out) <= set(every):
            raise ValueError(f"held_out {self.held_out} must be (colour, shape) pairs of this world")
        self.combos = {"train": [p for p in every if p not in self.held_out], "val": every}
        # what every rendering shares: pixel centres, and a smooth shading field and a pixel grain twice
        # the image's size, of which each scene shows the window at its own offset
        S, gen = image_size, np.random.default_rng(seed)
        self._pix = np.arange(S, dtype=np.float32) + 0.5  # (S,)
        yy, xx = np.mgrid[0: 2 * S, 0: 2 * S].astype(np.float32) / S  # (2S, 2S)
        waves = sum(np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + f[2]) for f in gen.uniform(-1.5, 1.5, (4, 3)))
        self._smooth = (0.03 * waves).astype(np.float32)  # (2S, 2S), about ±6% of brightness
        self._grain = gen.normal(0.5, 3.0, (3, 2 * S, 2 * S)).astype(np.float32)  # (3, 2S, 2S); +0.5 rounds

    def _new_scene(self, rng, n, combos):
        S, objects = self.image_size, []
        for _ in range(n):
            (colour, shape), size = rng.choice(combos), rng.choice(("small", "large"))
            r = S * rng.uniform(*self.RADIUS[size])
            for _ in range(50):  # rejection-sample a centre that overlaps nobody
                x, y = rng.uniform(r + 1, S - r - 1) / S, rng.uniform(r + 1, S - r - 1) / S
                # apart by both radii + 2 px, and clearly further apart along one axis than the other, so
                # that every left/right/above/below relation is plain to see
                if all(math.hypot(x - o["x"], y - o["y"]) * S > r + o["r"] + 2
                       and abs(abs(x - o["x"]) - abs(y - o["y"])) > 0.08 for o in objects):
                    objects.append({"shape": shape, "colour": colour, "size": size, "x": x, "y": y, "r": r})
                    break
            else:
                break  # no room left: fewer objects than drawn
        tint = [rng.uniform(205, 250) for _ in "rgb"]  # a light ground, slightly tinted
        return {"objects": objects, "background": {"tint": tint, "slope": [rng.uniform(-0.1, 0.1) for _ in "xy"],
                                                   "offset": [rng.randrange(S), rng.randrange(S)]}}

    def scene(self, split, index):
        assert split in self.combos, f"split must be train or val, got {split!r}"
        rng = random.Random(f"{self.seed}/{split}/{index}")  # a str seed is hashed (SHA-512): same everywhere
        weights = [1 / k for k in range(1, self.max_objects + 1)]  # 0.55 / 0.27 / 0.18 for up to 3 objects
        return self._new_scene(rng, rng.choices(range(1, self.max_objects + 1), weights)[0], self.combos[split])

    def single(self, split, index, colour, shape):
        """A one-object scene of the given class (zero-shot evaluation), any class in any split."""
        return self._new_scene(random.Random(f"{self.seed}/{split}/single/{index}"), 1, [(colour, shape)])

    def _sdf(self, shape, u, v, r):
        """Signed distance in px (< 0 inside) at offsets u (1, w), v (h, 1) from the centre; fits in radius r."""
        if shape == "circle":
            return np.sqrt(u * u + v * v) - r
        au, av = np.abs(u), np.abs(v)
        if shape == "square":
            return np.maximum(au, av) - 0.72 * r
        if shape == "triangle":  # pointing up, circumradius r: three edges at distance r/2 from the centre
            return np.maximum(v, 0.866 * au - 0.5 * v) - 0.5 * r
        assert shape == "cross", f"unknown shape {shape!r}"  # the union (min) of a horizontal and a vertical bar
        return np.minimum(np.maximum(au - 0.95 * r, av - 0.3 * r), np.maximum(au - 0.3 * r, av - 0.95 * r))

    def render(self, scene):
        """(H, W, 3) uint8: a shaded, grainy light ground and anti-aliased shapes. Drawn channel-first,
        where numpy's inner loops run along rows rather than over 3 channels (4x faster), and returned
        as a (H, W, 3) view of that buffer, so that the (3, H, W) tensor the datasets make needs no copy."""
        S, bg = self.image_size, scene["background"]
        (ox, oy), ramp = bg["offset"], self._pix / S - 0.5  # (S,)
        shade = 1 + self._smooth[oy: oy + S, ox: ox + S] + bg["slope"][0] * ramp + bg["slope"][1] * ramp[:, None]
        img = np.asarray(bg["tint"], dtype=np.float32)[:, None, None] * shade  # (3, S, S)
        for o in scene["objects"]:
            cx, cy, r = o["x"] * S, o["y"] * S, o["r"]
            x0, x1 = max(int(cx - r - 2), 0), min(int(cx + r + 3), S)  # only the box around the shape
            y0, y1 = max(int(cy - r - 2), 0), min(int(cy + r + 3), S)
            d = self._sdf(o["shape"], self._pix[None, x0:x1] - cx, self._pix[y0:y1, None] - cy, r)  # (h, w)
            alpha = np.clip(0.5 - d, 0, 1)  # (h, w): the share of each pixel the shape covers, anti-aliasing
            box = img[:, y0:y1, x0:x1]  # (3, h, w), a view: blending into it draws into img
            box += alpha * (np.asarray(self.RGB[o["colour"]], dtype=np.float32)[:, None, None] - box)
        img += self._grain[:, oy: oy + S, ox: ox + S]
        return np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)  # (S, S, 3)

    @staticmethod
    def relation(a, b):
        """Where a is relative to b, along the axis on which they are further apart (y points down)."""
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]
        if abs(dx) > abs(dy):
            return "to the left of" if dx < 0 else "to the right of"
        return "above" if dy < 0 else "below"

    def _phrase(self, o, rng):
        size = rng.choice(self.SIZE_WORDS[o["size"]]) + " " if rng.random() < 0.5 else ""
        return f"a {size}{o['colour']} {rng.choice(self.SHAPE_WORDS[o['shape']])}"

    def caption(self, scene, rng):
        """Names every object; a stated relation holds between the two phrases it joins."""
        objects = rng.sample(scene["objects"], len(scene["objects"]))
        text = self._phrase(objects[0], rng)
        if len(objects) > 1:
            joint = self.relation(objects[0], objects[1]) if rng.random() < 0.8 else "and"
            text += f" {joint} {self._phrase(objects[1], rng)}"
        for o in objects[2:]:
            text += f" and {self._phrase(o, rng)}"
        prefix = rng.choice(self.PREFIXES)
        return (prefix + " " if prefix else "") + text + rng.choice(("", "."))

    OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
                "below": "above"}

    def hard_negative(self, scene, caption, rng):
        """The caption with exactly one attribute made false: one object's colour, shape or size, or the
        stated relation turned around -> (text, kind). An ITM model must then check every word against
        the image; a random other caption differs in several at once. A changed phrase names no object
        of the scene (a colour or shape swapped for one that no object has in that combination)."""
        shape_of = {w: s for s, words in self.SHAPE_WORDS.items() for w in words}
        size_of = {w: s for s, words in self.SIZE_WORDS.items() for w in words}
        phrase = re.compile(rf"a (?:({'|'.join(size_of)}) )?({'|'.join(self.COLOURS)}) ({'|'.join(shape_of)})\b")
        present = {(o["colour"], o["shape"], o["size"]) for o in scene["objects"]}
        options = []  # (kind, start, end, replacement)
        for m in phrase.finditer(caption):
            colour, shape = m[2], shape_of[m[3]]
            options += [("colour", *m.span(2), c) for c in self.COLOURS
                        if not any((c, shape) == p[:2] for p in present)]
            options += [("shape", *m.span(3), rng.choice(self.SHAPE_WORDS[s])) for s in self.SHAPES
                        if not any((colour, s) == p[:2] for p in present)]
            sizes = {p[2] for p in present if p[:2] == (colour, shape)}
            if len(sizes) == 1:  # the phrase's object has one size: name the other one
                wrong = rng.choice(self.SIZE_WORDS["large" if sizes == {"small"} else "small"])
                options.append(("size", *m.span(1), wrong) if m[1] else ("size", m.start(2), m.start(2), wrong + " "))
        for rel, opposite in self.OPPOSITE.items():
            if f" {rel} " in caption:
                at = caption.index(f" {rel} ") + 1
                options.append(("relation", at, at + len(rel), opposite))
        by_kind = collections.defaultdict(list)
        for option in options:
            by_kind[option[0]].append(option)
        kind, start, end, new = rng.choice(by_kind[rng.choice(sorted(by_kind))])  # a kind, then one of its changes
        return caption[:start] + new + caption[end:], kind

    def answers(self):
        """Every answer questions() can give: the label set of the synthetic VQA task."""
        return [*self.COLOURS, *self.SHAPES, "yes", "no", *map(str, range(1, self.max_objects + 1))]

    def questions(self, scene, rng):
        """(question, one-word answer) pairs read off the scene graph; only well-posed ones are asked."""
        objects = scene["objects"]
        qa = [("how many objects are there?", str(len(objects)))]
        unique = [o for o in objects if sum(p["shape"] == o["shape"] for p in objects) == 1]
        if unique:
            o = rng.choice(unique)
            qa.append((f"what colour is the {o['shape']}?", o["colour"]))
        present = sorted({(o["colour"], o["shape"]) for o in objects})  # sorted: set order varies per process
        yes = rng.random() < 0.5  # balanced; "no" is never asked of a held-out class
        colour, shape = rng.choice(present if yes else [p for p in self.combos["train"] if p not in present])
        qa.append((f"is there a {colour} {shape}?", "yes" if yes else "no"))
        # "which shape is <rel> the red circle?" needs one red circle, and one object in that relation to it
        classes = [(o["colour"], o["shape"]) for o in objects]
        named = [o for o, c in zip(objects, classes) if classes.count(c) == 1]
        options = [(rel, ref, hits[0]) for ref in named for rel in self.RELATIONS
                   if len(hits := [o for o in objects if o is not ref and self.relation(o, ref) == rel]) == 1]
        if options:
            rel, ref, o = rng.choice(options)
            qa.append((f"which shape is {rel} the {ref['colour']} {ref['shape']}?", o["shape"]))
        return qa

    def vocabulary(self):
        """Every word that captions, prompt templates and questions can produce."""
        phrases = [*self.PREFIXES, *self.RELATIONS, *self.prompt_templates, self.QUESTION_WORDS, "a and .",
                   *self.answers(), *sum(self.SHAPE_WORDS.values(), ()), *sum(self.SIZE_WORDS.values(), ())]
        return sorted({w for p in phrases for w in _words(p.replace("{}", ""))})


# -----------------------------------------------------------------------------
# Image transforms


def _to_rgb(img):
    """Any PIL mode -> RGB: 16-bit/float grey scaled to 8 bits (not clipped to white), alpha over grey."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float32)
        peak = float(a.max()) if a.size else 0.0
        a = a / 257 if peak > 255 else a * 255 if img.mode == "F" and peak <= 1 else a  # 16-bit / [0,1] / 8-bit
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        ground = Image.new("RGBA", img.size, (128, 128, 128, 255))
        return Image.alpha_composite(ground, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, 1, YCbCr, ... (a copy when already RGB)


def _crop_box(w, h, train, rng):
    """torchvision's RandomResizedCrop with FLAVA's scale (0.9, 1) and ratio (3/4, 4/3) when training
    (10 tries, then the largest central crop in the ratio range); the central square for evaluation."""
    for _ in range(10 if train else 0):
        area = w * h * rng.uniform(0.9, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x, y, x + cw, y + ch
    cw, ch = (min(w, round(h * 4 / 3)), min(h, round(w * 4 / 3))) if train else (min(w, h), min(w, h))
    return (w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch


def image_transform(img, size, train, rng=None, squash=False):
    """PIL image (any mode, any size) -> uint8 (3, size, size): a crop, then one bicubic resize. squash (for
    evaluation): the whole image, aspect lost, as Hugging Face's FlavaImageProcessor prepares FLAVA's input."""
    img = _to_rgb(img)
    box = (0, 0, *img.size) if squash and not train else _crop_box(*img.size, train, rng or random)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (3, size, size)


def read_image(path, size, train, rng=None, squash=False):
    """Open, decode fully (so a truncated file fails here, inside the caller's try) and transform."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is an error, not a warning
        with Image.open(path) as img:
            if not squash:  # (squash copies Hugging Face's pixels, so decodes at full scale as it does)
                img.draft(None, (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale while still >= size
            img.load()
            return image_transform(img, size, train, rng, squash)


# -----------------------------------------------------------------------------
# Datasets: map-style, load(i) -> dict


class SyntheticPairs:
    """Captioned scenes: the paired source (FLAVA's PMD). Effectively infinite."""

    offset, keys = 0, ("image", "ids", "attn")  # each source reads its own scenes, from its own offset

    def __init__(self, world, split, tokenizer=None, text_len=None):
        self.world, self.split, self.tokenizer, self.text_len = world, split, tokenizer, text_len

    def __len__(self):
        return 2**31 - 1

    def load(self, i):
        scene, out = self.world.scene(self.split, self.offset + i), {}
        if "image" in self.keys:
            out["image"] = torch.from_numpy(self.world.render(scene)).permute(2, 0, 1)  # (3, H, W), contiguous
        if "ids" in self.keys:
            rng = random.Random(f"{self.world.seed}/{self.split}/{self.offset + i}/caption")
            ids, attn = self.tokenizer.encode(self.world.caption(scene, rng), self.text_len)
            out.update(ids=ids[0], attn=attn[0])  # (L,), (L,)
        return out

    __getitem__ = load


class SyntheticImages(SyntheticPairs):
    """Scenes without captions: the image-only source (FLAVA's ImageNet-1k)."""

    offset, keys = 2**31, ("image",)


class SyntheticTexts(SyntheticPairs):
    """Captions without images: the text-only source (FLAVA's CCNews + BookCorpus)."""

    offset, keys = 2**32, ("ids", "attn")


class _SkipBadFiles:
    """load(i) reads file i; an unreadable file is skipped for i+1, i+2, ... (deterministically), and the
    sample lists every (path, reason) it skipped, so that the trainer can count them."""

    squash = False  # evaluation resizes the whole image to a square (see image_transform), not its central crop

    def __len__(self):
        return len(self.files)

    def load(self, index, rng=None):  # rng: the random crop's generator (see Mixture)
        skipped = []
        for i in range(index, index + MAX_SKIPS):
            try:
                return {**self._read(i % len(self), rng), "skipped": skipped}
            except Exception as e:  # Pillow raises many types: OSError, SyntaxError, ValueError, zlib.error...
                skipped.append((str(self.files[i % len(self)]), f"{type(e).__name__}: {e}"))
        raise RuntimeError(f"{type(self).__name__}: no usable sample near index {index} "
                           f"({MAX_SKIPS} consecutive failures, e.g. {skipped[-1]})")

    __getitem__ = load


def _pair(record, root):
    """A JSONL line or a CSV row (a dict) -> (absolute image path, caption), or a ValueError saying why not."""
    try:
        row = json.loads(record) if isinstance(record, str) else record
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e}") from None
    if not isinstance(row, dict) or not {"image", "caption"} <= row.keys():
        raise ValueError("wrong keys: need image and caption")
    image, caption = row["image"], row["caption"]
    if not isinstance(image, str) or not isinstance(caption, str):
        raise ValueError("wrong types: image and caption must be strings")
    if not caption.strip():
        raise ValueError("blank caption")
    # a lexical check, symlinks not followed: "../x" or "/etc/x" cannot leave the folder, while a data
    # folder reached through a symlink stays usable
    file = os.path.abspath(os.path.join(root, image))
    if not file.startswith(root + os.sep):
        raise ValueError(f"path escapes the manifest's folder: {image}")
    return file, caption


class FilePairs(_SkipBadFiles):
    """Image-caption pairs from a manifest: JSONL lines {"image": path, "caption": text}, or a CSV with
    image and caption columns; paths relative to the manifest's folder. Bad rows are skipped and counted
    here (num_skipped; the first reasons in skipped), unreadable images when they are read."""

    def __init__(self, manifest_path, image_size, tokenizer, text_len, train=True):
        path = Path(manifest_path)
        if not path.is_file():
            raise FileNotFoundError(f"pairs manifest not found: {path}")
        self.image_size, self.tokenizer, self.text_len, self.train = image_size, tokenizer, text_len, train
        self.files, self.captions, self.skipped, self.num_skipped = [], [], [], 0
        root = os.path.abspath(path.parent)
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                missing = [c for c in ("image", "caption") if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"{path}: CSV header lacks the column(s) {missing} (has {reader.fieldnames})")
                records = ((reader.line_num, row) for row in reader)
            else:
                records = ((line_no, line) for line_no, line in enumerate(f, 1) if line.strip())
            for line_no, record in records:
                try:
                    file, caption = _pair(record, root)
                except ValueError as e:
                    self.num_skipped += 1
                    self.skipped += [(line_no, str(e))] if len(self.skipped) < 20 else []
                    continue
                self.files.append(file)
                self.captions.append(caption)
        if not self.files:
            raise ValueError(f"{path}: no usable rows ({self.num_skipped} skipped, e.g. {self.skipped[:3]})")

    def _read(self, i, rng=None):
        ids, attn = self.tokenizer.encode(self.captions[i], self.text_len)
        image = read_image(self.files[i], self.image_size, self.train, rng, self.squash)
        return {"image": image, "ids": ids[0], "attn": attn[0]}


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageFolder(_SkipBadFiles):
    """root/<class name>/**/<image>: labels index the sorted sub-folder names, '_' read as a space."""

    def __init__(self, root, image_size, train=True):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        self.image_size, self.train = image_size, train
        folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.classes = [d.name.replace("_", " ") for d in folders]
        self.files, self.labels = [], []
        for label, folder in enumerate(folders):
            found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.files += found
            self.labels += [label] * len(found)
        if not self.files:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders")

    def _read(self, i, rng=None):
        return {"image": read_image(self.files[i], self.image_size, self.train, rng, self.squash),
                "label": self.labels[i]}


class TextFile:
    """One passage a line; blank lines skipped; invalid UTF-8 replaced rather than fatal."""

    def __init__(self, path, tokenizer, text_len):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        self.tokenizer, self.text_len = tokenizer, text_len
        with open(path, encoding="utf-8", errors="replace") as f:
            # 64 characters a token is plenty: a longer line's tail could never fit in text_len
            self.lines = [line.strip()[: 64 * text_len] for line in f if line.strip()]
        if not self.lines:
            raise ValueError(f"{path}: no non-blank lines")

    def __len__(self):
        return len(self.lines)

    def load(self, i):
        ids, attn = self.tokenizer.encode(self.lines[i], self.text_len)
        return {"ids": ids[0], "attn": attn[0]}  # (L,), (L,)

    __getitem__ = load


# -----------------------------------------------------------------------------
# Mixing sources: one source per step, the same on every rank (FLAVA §3.3: each update one whole batch of one source)


class Mixture(torch.utils.data.Dataset):
    """Named datasets behind one index: mixture[(source, index)] -> that sample, plus "source". A key
    (source, index, seed) also seeds the sample's random crop, so that it is the same in any process."""

    def __init__(self, sources):
        self.sources = dict(sources)

    def __getitem__(self, key):
        source, index, *seed = key
        if seed and isinstance(self.sources[source], _SkipBadFiles):  # the file datasets crop at random
            return {**self.sources[source].load(index, random.Random(seed[0])), "source": source}
        return {**self.sources[source][index], "source": source}


@functools.lru_cache(maxsize=4)
def _permutation(seed, source, epoch, n):
    return np.random.default_rng(random.Random(f"{seed}/{source}/{epoch}").getrandbits(64)).permutation(n)


class MixtureBatchSampler:
    """Per step: the source (a pure function of seed and step, so every rank draws the same one), then
    this rank's local_batch (source, index) keys. The k-th step that draws a source reads positions
    k*global_batch ... (k+1)*global_batch - 1 of that source's stream, rank r its r-th slice of them.
    The stream runs through a fresh permutation each epoch and wraps into the next, so no rank ever
    runs out (shards of unequal length are padded by wrapping; nothing is dropped), and a sampler built
    with start_step=s yields exactly what an uninterrupted one does. With seeds=True a key also carries
    the sample's seed, "seed/source/position": its augmentation then depends on nothing else."""

    def __init__(self, sizes, probs, global_batch, rank=0, world_size=1, seed=0, start_step=0, steps=None,
                 seeds=False):
        if global_batch % world_size:
            raise ValueError(f"global_batch={global_batch} is not divisible by world_size={world_size}")
        self.names = sorted(s for s in sizes if probs.get(s, 0) > 0)  # sorted: identical on every rank
        if not self.names:
            raise ValueError(f"no source with a positive probability among {sorted(sizes)} (probs {probs})")
        total = sum(probs[s] for s in self.names)
        self.cdf = list(np.cumsum([probs[s] / total for s in self.names]))
        self.sizes, self.global_batch, self.local_batch = dict(sizes), global_batch, global_batch // world_size
        self.rank, self.seed, self.start_step, self.steps = rank, seed, start_step, steps  # steps: where to stop
        self.seeds = seeds
        self.drawn = collections.Counter(self.source_at(t) for t in range(start_step))  # k of each source

    def source_at(self, step):
        u = random.Random(f"{self.seed}/{step}").random()
        return self.names[min(bisect.bisect_right(self.cdf, u), len(self.names) - 1)]

    def index(self, source, g):
        """Stream position g -> sample index: position g % n of epoch g // n's permutation."""
        n = self.sizes[source]
        if n > 2**25:  # synthetic (or huge) sources: no permutation in memory; their order is random anyway
            return g % n
        return int(_permutation(self.seed, source, g // n, n)[g % n])

    def __iter__(self):
        drawn, step = collections.Counter(self.drawn), self.start_step
        while self.steps is None or step < self.steps:
            source = self.source_at(step)
            base = drawn[source] * self.global_batch + self.rank * self.local_batch
            drawn[source] += 1
            positions = range(base, base + self.local_batch)
            if self.seeds:
                yield [(source, self.index(source, g), f"{self.seed}/{source}/{g}") for g in positions]
            else:
                yield [(source, self.index(source, g)) for g in positions]
            step += 1


def collate(samples):
    """Samples of one source -> (source, batch): image uint8 (B, 3, H, W), ids (B, L), attn (B, L) bool,
    label (B,) where present, and skipped: every (path, reason) skipped on the way."""
    first = samples[0]
    assert all(s.get("source") == first.get("source") for s in samples), "one source per batch"
    source = first.get("source") or ("texts" if "image" not in first else "pairs" if "ids" in first else "images")
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", "ids", "attn") if k in first}
    if "label" in first:
        batch["label"] = torch.tensor([s["label"] for s in samples])  # (B,)
    batch["skipped"] = [x for s in samples for x in s.get("skipped", ())]
    return source, batch


def make_loader(mixture, batch_sampler, num_workers=0, pin_memory=False):
    """Yields (source, batch) per step; workers persist across the (endless) iteration."""
    return torch.utils.data.DataLoader(mixture, batch_sampler=batch_sampler, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=num_workers > 0)


if __name__ == "__main__":  # a look at the world: 64 scenes, and the captions of the first 8
    world = ShapesWorld()
    rows = [np.concatenate([world.render(world.scene("train", 8 * r + c)) for c in range(8)], 1) for r in range(8)]
    Image.fromarray(np.concatenate(rows)).save("shapes_world.png")
    print(*(world.caption(world.scene("train", i), random.Random(i)) for i in range(8)), sep="\n")

"""What goes in: tokenizer, the synthetic shapes world, file datasets, image transforms, multi-source sampling.

FLAVA (arXiv 2112.04482, §3.4) draws each update from one source: image-text pairs, images alone or
text alone (0.70 / 0.15 / 0.15). Each source exists twice here: in an embedded synthetic world
(captioned scenes of coloured shapes, deterministic, no downloads) and as files on disk (a JSONL/CSV
manifest of pairs, an image folder tree, a text file), pairs also as web-scale tar shards, streamed.
Images come out as uint8 (3, H, W): the model normalises them (with CLIP's statistics) and the step computes
its image-tokenizer targets itself. Transforms follow FLAVA's public code: random-resized crop, scale (0.9, 1.0),
for training; resize + centre crop for eval.

    python data.py                      # draws 64 scenes to shapes_world.png and prints captions
    python data.py shards pairs.jsonl shards/ --per_shard 10000   # WebDataset tar shards from a manifest
    python -m pytest tests/test_data.py tests/test_manifests.py tests/test_shards.py
"""
import array
import bisect
import collections
import csv
import functools
import glob
import io
import json
import math
import os
import random
import re
import sys
import tarfile
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SOURCES = ("pairs", "images", "texts")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # in the order of Tokenizer.special_ids
PROMPTS = ("a {}.", "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "there is a {}.")  # zero-shot
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
    prompt_templates = (*PROMPTS, "a small {}.", "a large {}.")  # zero-shot templates: the real ones and two more

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

    def name(self, i):
        return str(self.files[i])

    def load(self, index, rng=None):  # rng: the random crop's generator (see Mixture)
        skipped = []
        for i in range(index, index + MAX_SKIPS):
            try:
                return {**self._read(i % len(self), rng), "skipped": skipped}
            except Exception as e:  # Pillow raises many types: OSError, SyntaxError, ValueError, zlib.error...
                skipped.append((self.name(i % len(self)), f"{type(e).__name__}: {e}"))
        raise RuntimeError(f"{type(self).__name__}: no usable sample near index {index} "
                           f"({MAX_SKIPS} consecutive failures, e.g. {skipped[-1]})")

    __getitem__ = load


class _Lines:
    """Decoded lines of a binary file that know the byte offset of the next line (a text-mode file cannot
    tell() while it is iterated); a UTF-8 byte-order mark is stepped over."""

    def __init__(self, f):
        self.f, self.pos = f, 3 if f.read(3) == b"\xef\xbb\xbf" else 0
        f.seek(self.pos)

    def __iter__(self):
        return self

    def __next__(self):
        line = self.f.readline()
        if not line:
            raise StopIteration
        self.pos += len(line)
        return line.decode("utf-8", errors="replace")


class Rows:
    """The records of a text file, read when asked for through their byte offsets. The index is one numpy
    array (8 bytes a row), not Python lists of strings: a forked DataLoader worker shares its pages, where
    merely reading a list's items writes their reference counts and copies every page into every worker.
    rows[i] is line i (stripped), or with a CSV header the dict of the record that starts there."""

    def __init__(self, path, starts, header=None):
        self.path, self.starts, self.header = path, np.asarray(starts, dtype=np.int64), header

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with open(self.path, "rb") as f:
            f.seek(self.starts[i])
            if self.header is None:
                return f.readline().decode("utf-8", errors="replace").strip()
            return next(csv.DictReader(io.TextIOWrapper(f, "utf-8", "replace", newline=""), self.header))


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
    image and caption columns; paths relative to the manifest's folder. Every row is checked once here and
    the usable ones indexed by byte offset (Rows); bad rows are skipped and counted here (num_skipped; the
    first reasons in skipped), unreadable images when they are read."""

    def __init__(self, manifest_path, image_size, tokenizer, text_len, train=True):
        path = Path(manifest_path)
        if not path.is_file():
            raise FileNotFoundError(f"pairs manifest not found: {path}")
        self.image_size, self.tokenizer, self.text_len, self.train = image_size, tokenizer, text_len, train
        self.root, starts, self.skipped, self.num_skipped = os.path.abspath(path.parent), array.array("q"), [], 0
        header, reader, line_no = None, None, 0
        with open(path, "rb") as f:
            lines = _Lines(f)
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(lines)
                header = reader.fieldnames or []
                missing = [c for c in ("image", "caption") if c not in header]
                if missing:
                    raise ValueError(f"{path}: CSV header lacks the column(s) {missing} (has {header})")
            while True:
                start = lines.pos  # a CSV record may span lines, a JSONL record is one
                record = next(reader or lines, None)
                if record is None:
                    break
                line_no = reader.line_num if reader else line_no + 1
                if reader is None and not record.strip():
                    continue
                try:
                    _pair(record, self.root)
                    starts.append(start)
                except ValueError as e:
                    self.num_skipped += 1
                    self.skipped += [(line_no, str(e))] if len(self.skipped) < 20 else []
        self.rows = Rows(path, starts, header)
        if not len(self.rows):
            raise ValueError(f"{path}: no usable rows ({self.num_skipped} skipped, e.g. {self.skipped[:3]})")

    def __len__(self):
        return len(self.rows)

    def pair(self, i):
        """(absolute image path, caption) of usable row i, read from the manifest now."""
        return _pair(self.rows[i], self.root)

    def name(self, i):
        return self.pair(i)[0]

    def _read(self, i, rng=None):
        file, caption = self.pair(i)
        ids, attn = self.tokenizer.encode(caption, self.text_len)
        image = read_image(file, self.image_size, self.train, rng, self.squash)
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
    """One passage a line, indexed by byte offset (Rows); blank lines skipped; invalid UTF-8 replaced."""

    def __init__(self, path, tokenizer, text_len):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        self.tokenizer, self.text_len, starts = tokenizer, text_len, array.array("q")
        with open(path, "rb") as f:
            lines = _Lines(f)
            start = lines.pos
            for line in lines:
                if line.strip():
                    starts.append(start)
                start = lines.pos
        self.lines = Rows(path, starts)
        if not len(self.lines):
            raise ValueError(f"{path}: no non-blank lines")

    def __len__(self):
        return len(self.lines)

    def load(self, i):
        # 64 characters a token is plenty: a longer line's tail could never fit in text_len
        ids, attn = self.tokenizer.encode(self.lines[i][: 64 * self.text_len], self.text_len)
        return {"ids": ids[0], "attn": attn[0]}  # (L,), (L,)

    __getitem__ = load


# -----------------------------------------------------------------------------
# Tar shards: web-scale pairs in the WebDataset layout, streamed

SHARD_IMAGES, SHARD_TEXTS = ("jpg", "jpeg", "png", "webp"), ("txt", "json")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand(spec):
    m = _RANGE.search(spec)  # "{00000..00099}": every number between, as wide as the first bound
    return [spec] if not m else [p for i in range(int(m[1]), int(m[2]) + 1)
                                 for p in _expand(spec[: m.start()] + str(i).zfill(len(m[1])) + spec[m.end():])]


def shard_list(spec):
    """--shards SPEC -> tar paths: a folder (its *.tar), a glob, or brace ranges ('data/{00000..00099}.tar', as
    OpenCLIP's --train-data). A listed shard that is missing stays listed: reading it fails and is counted."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    else:
        paths = [q for p in _expand(spec) for q in (sorted(glob.glob(p)) if set("*?[") & set(p) else [p])]
    if not any(os.path.isfile(p) for p in paths):
        raise FileNotFoundError(f"--shards {spec}: no tar shard there (expected a folder of .tar files, a glob, "
                                f"or brace ranges like data/{{00000..00099}}.tar)")
    return paths


def tar_groups(path, skip=0):
    """The samples of an uncompressed WebDataset tar in order: (key, {ext: (offset, size, bytes)}) for each run
    of consecutive members with one key (the name up to the first dot of its last part), after the first `skip`
    (passed over unread). A tar that stops without its end-of-archive block was cut short: a ReadError."""
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        key, group, n = None, {}, -1
        for info in tar:
            if not info.isfile():
                continue
            cut = info.name.find(".", info.name.rfind("/") + 1)
            name, ext = (info.name[:cut], info.name[cut + 1:].lower()) if cut >= 0 else (info.name, "")
            if name != key:
                if n >= skip:
                    yield key, group
                key, group, n = name, {}, n + 1
            if n >= skip:
                group[ext] = (info.offset_data, info.size, tar.extractfile(info).read())
        if n >= skip:
            yield key, group
        f.seek(tar.offset)  # tarfile ends quietly at a cut or a damaged header; a whole tar ends in zero blocks
        if f.read(512) != bytes(512):
            raise tarfile.ReadError("no end-of-archive block after its last sample: cut short or damaged")


class TarShards:
    """Image-caption pairs streamed from tar shards (FLAVA's PMD and FLIP's LAION are distributed this way):
    KEY.jpg|jpeg|png|webp + KEY.txt, or KEY.json with a "caption" field. No length and no index: the trainer
    streams it (ShardStream, Batches), with the same transforms as files; a bad sample and an unreadable shard
    are skipped and counted as a bad file is."""

    def __init__(self, spec, image_size, tokenizer, text_len, buffer=1000):
        self.shards, self.buffer = shard_list(spec), buffer
        self.image_size, self.tokenizer, self.text_len = image_size, tokenizer, text_len

    def shard(self, pos, seed):
        """The shard at place pos of the endless sequence of epochs, each the shards in a fresh order."""
        return self._order(seed, pos // len(self.shards))[pos % len(self.shards)]

    @functools.lru_cache(maxsize=4)
    def _order(self, seed, epoch):
        n = len(self.shards)
        return [self.shards[i] for i in permute(np.arange(n), n, f"{seed}/shards/{epoch}")]

    @staticmethod
    def lacks(group):
        missing = [what for what, exts in (("an image", SHARD_IMAGES), ("a caption", SHARD_TEXTS))
                   if not set(exts) & group.keys()]
        return f"no {' and no '.join(missing)} among its members {sorted(group)}" if missing else None

    @staticmethod
    def caption(group):
        if "txt" in group:
            text = group["txt"][2].decode("utf-8", errors="replace")
        else:
            row = json.loads(group["json"][2])
            text = row.get("caption") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError("blank caption, or no caption string in the .json")
        return text

    def captions(self, limit):
        """Up to limit captions from the shards in listed order (a vocabulary's corpus); bad ones passed over."""
        out = []
        for path in self.shards:
            try:
                for _, group in tar_groups(path):
                    out += [self.caption(group)] if len(out) < limit and not self.lacks(group) else []
            except Exception:  # unreadable shards and captions are counted when training reads them
                pass
            if len(out) >= limit:
                break
        return out

    def decode(self, group, rng):
        image = read_image(io.BytesIO(group[next(e for e in SHARD_IMAGES if e in group)][2]), self.image_size,
                           True, rng)
        ids, attn = self.tokenizer.encode(self.caption(group), self.text_len)
        return {"image": image, "ids": ids[0], "attn": attn[0]}


class _ShardReader:
    """Reader j of R (every DataLoader worker of every rank is one). The epochs' shard orders laid end to end
    are an endless sequence of places; reader j reads places j, j + R, j + 2R, ..., so in each epoch each shard
    is read by one reader. Samples pass a shuffle buffer (hold `buffer`, emit a random one, refill its slot).
    state() is small and exact: the place, samples taken from its shard, the buffer as references (place, key,
    member offsets) and samples emitted; a reader built from it continues as if never stopped."""

    def __init__(self, source, seed, j, R, state=None):
        self.source, self.seed, self.j, self.R, self.samples, self.pending = source, seed, j, R, None, []
        state = state or {"pos": j, "taken": 0, "emitted": 0, "buffer": []}
        self.pos, self.taken, self.emitted = state["pos"], state["taken"], state["emitted"]
        self.buffer = [self._reread(*ref) for ref in state["buffer"]]

    def state(self):
        refs = [(pos, key, [(e, o, s) for e, (o, s, _) in group.items()]) for pos, key, group in self.buffer]
        return {"pos": self.pos, "taken": self.taken, "emitted": self.emitted, "buffer": refs}

    def _reread(self, pos, key, members):
        group = {}
        with open(self.source.shard(pos, self.seed), "rb") as f:
            for ext, offset, size in members:
                f.seek(offset)
                group[ext] = (offset, size, f.read(size))
        return pos, key, group

    def _next_group(self):
        failed, bad = 0, 0  # unreadable shards and incomplete samples in a row
        while True:
            path = self.source.shard(self.pos, self.seed)
            self.samples = self.samples or tar_groups(path, skip=self.taken)
            try:
                key, group = next(self.samples)
                self.taken += 1
                reason = self.source.lacks(group)
                if reason is None:
                    return self.pos, key, group
                self.pending.append((f"{path}:{key}", reason))
                bad += 1
                if bad > MAX_SKIPS:
                    raise RuntimeError(f"{MAX_SKIPS} samples in a row are incomplete, e.g. {path}:{key}: {reason}")
                continue
            except StopIteration:
                pass
            except Exception as e:  # OSError, tarfile.ReadError, ...: the shard's samples read so far were used
                self.pending.append((path, f"{type(e).__name__}: {e}"))
                failed += 1
                if failed > len(self.source.shards):
                    raise RuntimeError(f"no shard of {len(self.source.shards)} is readable, e.g. {self.pending[-1]}")
            self.samples, self.pos, self.taken = None, self.pos + self.R, 0

    def next_sample(self):
        """The next sample out of the buffer, with skipped: every (shard or shard:key, reason) passed over."""
        for _ in range(MAX_SKIPS):
            while len(self.buffer) < self.source.buffer:
                self.buffer.append(self._next_group())
            slot = random.Random(f"{self.seed}/{self.j}/{self.emitted}").randrange(len(self.buffer))
            (pos, key, group), self.buffer[slot] = self.buffer[slot], self._next_group()
            self.emitted += 1
            shard = self.source.shard(pos, self.seed)
            try:  # the crop: a function of the sample and its epoch, whichever reader reads it
                rng = random.Random(f"{self.seed}/{os.path.basename(shard)}/{key}/{pos // len(self.source.shards)}")
                sample = self.source.decode(group, rng)
            except Exception as e:
                self.pending.append((f"{shard}:{key}", f"{type(e).__name__}: {e}"))
                continue
            sample["skipped"], self.pending = self.pending, []
            return sample
        raise RuntimeError(f"{MAX_SKIPS} samples in a row could not be decoded, e.g. {self.pending[-1]}")


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's endless batches of a streamed source: (name, batch), the batch carrying stream = (reader,
    its state after the batch). With W workers the DataLoader takes batch k from worker k % W (it reads its
    workers in turn); so that a resumed loader, which starts at worker 0, continues batch k0 with reader
    k0 % W, worker w plays reader (k0 + w) % W. state: {"batches": k0, "readers": {j: state}} (see Batches)."""

    def __init__(self, source, name, local_batch, seed, rank, world_size, state):
        self.source, self.name, self.local_batch, self.seed = source, name, local_batch, seed
        self.rank, self.world_size, self.state = rank, world_size, state

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        j = self.rank * W + (self.state["batches"] + w) % W
        reader = _ShardReader(self.source, self.seed, j, self.world_size * W, self.state["readers"].get(j))
        while True:
            name, batch = collate([{**reader.next_sample(), "source": self.name} for _ in range(self.local_batch)])
            batch["stream"] = (j, reader.state())
            yield name, batch


# -----------------------------------------------------------------------------
# Mixing sources: one source per step, the same on every rank (design.md §3)


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


@functools.lru_cache(maxsize=64)
def _round_keys(key):
    return np.array([random.Random(f"{key}/{r}").getrandbits(64) for r in range(6)], dtype=np.uint64)


def _mix(z):  # splitmix64's finaliser: every output bit depends on every input bit
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(x, n, key):
    """A bijection of [0, n) chosen by the string key, applied to the positions x (ints): six rounds of a
    balanced Feistel network on the smallest even number of bits that covers n, cycle-walked back into
    [0, n) (Black & Rogaway 2002, "Ciphers with arbitrary finite domains"; the domain is < 4n, so < 4
    rounds of walking on average). O(1) memory for any n, where a shuffled list of 2^31 positions is 16 GB."""
    half = max(1, ((int(n) - 1).bit_length() + 1) // 2)
    mask, shift, keys = np.uint64((1 << half) - 1), np.uint64(half), _round_keys(key)

    def feistel(v):  # (left, right) -> (right, left ^ F(right)): invertible whatever F is
        left, right = v >> shift, v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    y = feistel(np.asarray(x, dtype=np.uint64))
    while (out := y >= n).any():  # walk the cycle until it re-enters [0, n): still a bijection of [0, n)
        y[out] = feistel(y[out])
    return y.astype(np.int64)


class MixtureBatchSampler:
    """Per step: the source (a pure function of seed and step, so every rank draws the same one), then
    this rank's local_batch (source, index) keys. The k-th step that draws a source reads positions
    k*global_batch ... (k+1)*global_batch - 1 of that source's stream, rank r its r-th slice of them.
    The stream runs through a fresh permutation each epoch (permute: any size, no list of positions)
    and wraps into the next, so no rank ever runs out (shards of unequal length are padded by wrapping;
    nothing is dropped), and a sampler built with start_step=s yields exactly what an uninterrupted one
    does. With seeds=True a key also carries the sample's seed, "seed/source/position": its augmentation
    then depends on nothing else. A source of size None is streamed: its steps are left to its own loader."""

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
        self.seeds, self.world_size = seeds, world_size
        self.drawn = collections.Counter(self.source_at(t) for t in range(start_step))  # k of each source

    def source_at(self, step):
        u = random.Random(f"{self.seed}/{step}").random()
        return self.names[min(bisect.bisect_right(self.cdf, u), len(self.names) - 1)]

    def indices(self, source, positions):
        """Stream positions g -> sample indices: place g % n of epoch g // n's permutation of [0, n)."""
        n, g = self.sizes[source], np.asarray(positions, dtype=np.int64)
        out = np.empty_like(g)
        for epoch in np.unique(g // n).tolist():
            at = g // n == epoch
            out[at] = permute(g[at] % n, n, f"{self.seed}/{source}/{epoch}")
        return out.tolist()

    def __iter__(self):
        drawn, step = collections.Counter(self.drawn), self.start_step
        while self.steps is None or step < self.steps:
            source = self.source_at(step)
            step += 1
            if self.sizes[source] is None:  # a streamed source: its own loader serves this step (Batches)
                continue
            base = drawn[source] * self.global_batch + self.rank * self.local_batch
            drawn[source] += 1
            positions = range(base, base + self.local_batch)
            indices = self.indices(source, positions)
            if self.seeds:
                yield [(source, i, f"{self.seed}/{source}/{g}") for g, i in zip(positions, indices)]
            else:
                yield [(source, i) for i in indices]


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


class Batches:
    """(source, batch) for each step from the sampler's start_step on: the map-style sources through one
    DataLoader over the Mixture (the sampler's keys), each streamed source through its own (ShardStream); the
    sampler's choice of source, the same on every rank, says which loader serves a step. state() is what a
    checkpoint keeps of the streams: the batches taken, and this rank's readers (the trainer gathers all ranks').
    A state saved by another number of readers (world size x workers) cannot be continued exactly: the readers
    restart at the lowest place not finished, with empty buffers; of that epoch, what the old buffers held is
    not seen (at most one buffer per old reader), and the shards read beyond that place are read again."""

    def __init__(self, mixture, sampler, num_workers=0, pin_memory=False, states=None):
        self.sampler, self.step, self.streams, self.states = sampler, sampler.start_step, {}, {}
        W = max(1, num_workers)
        R, self.mine = sampler.world_size * W, range(sampler.rank * W, (sampler.rank + 1) * W)
        for name in [s for s in sampler.names if sampler.sizes[s] is None]:
            old = (states or {}).get(name) or {"batches": 0, "readers": {}, "R": R}
            readers = dict(old["readers"])
            if old["R"] != R:  # saved by another topology: see above
                start = min(readers.get(i, {"pos": i})["pos"] for i in range(old["R"]))
                readers = {j: {"pos": start + j, "taken": 0, "emitted": 0, "buffer": []} for j in range(R)}
            self.states[name] = {"batches": old["batches"], "readers": readers, "R": R}
            stream = ShardStream(mixture.sources[name], name, sampler.local_batch, sampler.seed, sampler.rank,
                                 sampler.world_size, self.states[name])
            self.streams[name] = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                                                  pin_memory=pin_memory,
                                                                  persistent_workers=num_workers > 0))
        mapped = any(sampler.sizes[s] is not None for s in sampler.names)
        self.mixture = iter(make_loader(mixture, sampler, num_workers, pin_memory)) if mapped else None

    def __iter__(self):
        return self

    def __next__(self):
        source = self.sampler.source_at(self.step)
        self.step += 1
        if source not in self.streams:
            return next(self.mixture)
        name, batch = next(self.streams[source])
        reader, state = batch.pop("stream")
        self.states[source]["readers"][reader] = state
        self.states[source]["batches"] += 1
        return name, batch

    def state(self):
        return {name: {**s, "readers": {j: r for j, r in s["readers"].items() if j in self.mine}}
                for name, s in self.states.items()}


def write_shards(manifest, out_dir, per_shard=10_000):
    """A JSONL/CSV manifest -> out_dir/00000.tar, 00001.tar, ...: usable row i becomes the sample KEY.<ext> +
    KEY.txt, KEY its number; image bytes are copied as they are (a format the readers do not take is
    re-encoded as PNG), an unreadable file is left out. Then every shard is read back and its samples
    counted. -> (samples written, shard paths, [(file, reason) left out], manifest rows skipped)"""
    rows, left_out, paths, written = FilePairs(manifest, 0, None, 0), [], [], []
    os.makedirs(out_dir, exist_ok=True)
    for first in range(0, len(rows), per_shard):
        paths.append(os.path.join(out_dir, f"{first // per_shard:05d}.tar"))
        written.append(0)
        with tarfile.open(paths[-1] + ".tmp", "w") as tar:
            for i in range(first, min(first + per_shard, len(rows))):
                file, caption = rows.pair(i)
                ext = Path(file).suffix.lower().lstrip(".")
                try:
                    if ext in SHARD_IMAGES:
                        payload = Path(file).read_bytes()
                    else:
                        with Image.open(file) as img, io.BytesIO() as buf:
                            _to_rgb(img).save(buf, "PNG")
                            payload, ext = buf.getvalue(), "png"
                except Exception as e:
                    left_out.append((file, f"{type(e).__name__}: {e}"))
                    continue
                for member, content in ((f"{i:09d}.{ext}", payload), (f"{i:09d}.txt", caption.encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
                written[-1] += 1
        os.replace(paths[-1] + ".tmp", paths[-1])
    for path, n in zip(paths, written):  # the check: each shard whole, with every sample complete
        found = sum(TarShards.lacks(group) is None for _, group in tar_groups(path))
        if found != n:
            raise RuntimeError(f"{path}: wrote {n} samples but {found} read back")
    return sum(written), paths, left_out, rows.num_skipped


def main(argv):
    """python data.py: a look at the world (64 scenes, the captions of the first 8); python data.py shards
    MANIFEST OUT_DIR --per_shard N: tar shards from a manifest, checked."""
    if argv[:1] != ["shards"]:
        world = ShapesWorld()
        rows = [np.concatenate([world.render(world.scene("train", 8 * r + c)) for c in range(8)], 1) for r in range(8)]
        Image.fromarray(np.concatenate(rows)).save("shapes_world.png")
        return print(*(world.caption(world.scene("train", i), random.Random(i)) for i in range(8)), sep="\n")
    import argparse

    parser = argparse.ArgumentParser(prog="data.py shards", description="WebDataset tar shards from a manifest")
    parser.add_argument("manifest", help="JSONL/CSV manifest of image-caption pairs")
    parser.add_argument("out_dir", help="where 00000.tar, 00001.tar, ... go")
    parser.add_argument("--per_shard", type=int, default=10_000, help="samples per shard")
    args = parser.parse_args(argv[1:])
    try:
        n, paths, left_out, bad_rows = write_shards(args.manifest, args.out_dir, args.per_shard)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"data.py: error: {e}\n")
    print(f"wrote {n} samples into {len(paths)} shards, each read back whole; left out: {bad_rows} bad manifest "
          f"rows, {len(left_out)} unreadable images {left_out[:5]}\n"
          f"train with: --shards '{os.path.join(args.out_dir, '{00000..%05d}.tar' % (len(paths) - 1))}'")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The embedded default: a synthetic world of captioned scenes of coloured shapes, generated deterministically in
memory, so that `python train.py` trains and evaluates FLAVA on a CPU in minutes, offline.

Companion of data.py (its Synthetic* sources read scenes from here) and eval.py (held-out scenes, hard negatives,
questions for VQA). Every scene is a function of (seed, split, index); the val split holds (colour, shape)
combinations that training never shows, for zero-shot composition. A caption names every object, and a relation
it states holds in the image, so every objective has something true to learn.

    python shapes.py      # draws 64 scenes to shapes_world.png and prints captions (also: python data.py)
    python -m pytest tests/test_data.py -k "world or scene or caption or question"
"""
import collections
import math
import random
import re

import numpy as np
from PIL import Image

import bert_words
import data


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
    prompt_templates = (*data.PROMPTS, "a small {}.", "a large {}.")  # zero-shot templates: the real ones and two more

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
        return sorted({w for p in phrases for w in bert_words.words(p.replace("{}", ""))})


def main():
    """python shapes.py (or python data.py): 64 scenes drawn to shapes_world.png, the captions of the first 8."""
    world = ShapesWorld()
    rows = [np.concatenate([world.render(world.scene("train", 8 * r + c)) for c in range(8)], 1) for r in range(8)]
    Image.fromarray(np.concatenate(rows)).save("shapes_world.png")
    print(*(world.caption(world.scene("train", i), random.Random(i)) for i in range(8)), sep="\n")


if __name__ == "__main__":
    main()

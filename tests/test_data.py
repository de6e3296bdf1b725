"""Tests for data.py: tokenizer, shapes world, image transforms, file datasets, multi-source sampling.

    python -m pytest tests/test_data.py
"""
import collections
import itertools
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data  # the repository root is on sys.path via conftest.py
from data import (SPECIALS, Mixture, MixtureBatchSampler, SyntheticImages, SyntheticPairs, SyntheticTexts,
                  Tokenizer, collate, image_transform, make_loader)
from manifests import FilePairs, ImageFolder, TextFile, read_image
from shapes import ShapesWorld

CORPUS = ["a red circle, to the left of a blue square", "there is a small green triangle.",
          "A photo of a big yellow star!", "an image of a purple cross above a brown box"]

# -----------------------------------------------------------------------------
# tokenizer


def test_roundtrip_and_pieces():
    tok = Tokenizer.from_corpus(CORPUS)
    assert tok.special_ids == (0, 1, 2, 3, 4) and len(tok) == len(tok.vocab)
    text = "A red circle, to the left of a BIG blue square!"
    ids, attn = tok.encode(text, 32)
    assert ids.shape == attn.shape == (1, 32) and ids.dtype == torch.long and attn.dtype == torch.bool
    assert tok.decode(ids[0]) == "a red circle , to the left of a big blue square !"
    # a word never seen is built from pieces (every seen character is in the vocabulary), never [UNK]
    ids, _ = tok.encode("circles abracadabra", 32)
    assert tok.unk_id not in ids.tolist()[0] and tok.decode(ids[0]) == "circles abracadabra"
    assert any(tok.vocab[i].startswith("##") for i in ids[0].tolist())
    # a tiny vocabulary: a word that cannot be pieced is one [UNK]; an over-long word is [UNK]
    tiny = Tokenizer([*SPECIALS, "a", "red", "##s"])
    assert tiny.encode("a red zebra reds", 8)[0][0].tolist() == [2, 5, 6, 1, 6, 7, 3, 0]
    assert tok.encode("a" * 101, 4)[0][0].tolist() == [2, tok.unk_id, 3, 0]


def test_from_corpus_suffixes_and_vocab_size():
    words = [f"w{i}ing" for i in range(300)] + ["walking", "talking"]
    tok = Tokenizer.from_corpus([" ".join(words)], vocab_size=80)
    assert "##ing" in tok.vocab and len(tok) <= 80  # room left for frequent suffixes of words left out
    assert Tokenizer.from_corpus(CORPUS).vocab == Tokenizer.from_corpus(CORPUS).vocab  # deterministic


def test_case_accents_punctuation():
    tok = Tokenizer.from_corpus(["cafe naive resume"])
    for text in ["Café NAÏVE résumé", "cafe\u0301 naive resume"]:  # precomposed and decomposed accents
        assert tok.decode(tok.encode(text, 16)[0][0]) == "cafe naive resume"
    tok = Tokenizer.from_corpus(["x , . _ ( )"])
    assert tok.decode(tok.encode("x,x...x_x(x)", 32)[0][0]) == "x , x . . . x _ x ( x )"


def test_length_truncation_padding():
    tok = Tokenizer.from_corpus(CORPUS)
    ids, attn = tok.encode(["a red circle to the left of a blue square", "a star", ""], 6)
    assert ids.shape == (3, 6)
    assert ids[0, 0] == tok.cls_id and ids[0, -1] == tok.sep_id and attn[0].all()  # truncated, [SEP] kept
    assert tok.decode(ids[0]) == "a red circle to"
    assert ids[1].tolist()[:4] == [tok.cls_id, tok.index["a"], tok.index["star"], tok.sep_id]
    assert ids[1, 4:].tolist() == [tok.pad_id] * 2 and attn[1].tolist() == [True] * 4 + [False] * 2
    assert ids[2].tolist()[:2] == [tok.cls_id, tok.sep_id] and attn[2].sum() == 2
    line = ("word " * 5000)[:25000]  # a 25,000-character line is cut without reading it all:
    looked_up, word_ids = [], tok._word_ids  # 5,000 words, but only those that fit are tokenised
    tok._word_ids = lambda raw: looked_up.append(raw) or word_ids(raw)
    ids, attn = tok.encode(line, 64)
    assert attn.all() and ids[0, -1] == tok.sep_id and len(looked_up) <= 63


def test_vocab_file_bert_layout_and_save(tmp_path):
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                "the", "red", "circle", "##s", ","]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = Tokenizer.from_vocab_file(tmp_path / "vocab.txt")
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.encode("The red circles, blue", 10)[0][0].tolist() == [101, 104, 105, 106, 107, 108, 100, 102, 0, 0]
    tok.save(tmp_path / "saved.txt")
    again = Tokenizer.from_vocab_file(tmp_path / "saved.txt")
    assert again.vocab == tok.vocab == Tokenizer(tok.vocab).vocab
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.from_vocab_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        Tokenizer.from_vocab_file(tmp_path / "empty.txt")
    (tmp_path / "nomask.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n")
    with pytest.raises(ValueError, match=r"nomask.txt.*\[MASK\]"):
        Tokenizer.from_vocab_file(tmp_path / "nomask.txt")


# -----------------------------------------------------------------------------
# the shapes world

WORLD = ShapesWorld(image_size=64)
SHAPE_OF = {w: s for s, words in ShapesWorld.SHAPE_WORDS.items() for w in words}
SIZE_OF = {w: s for s, words in ShapesWorld.SIZE_WORDS.items() for w in words}
COLOUR = "|".join(ShapesWorld.COLOURS)
PHRASE = rf"a (?:({'|'.join(SIZE_OF)}) )?({COLOUR}) ({'|'.join(SHAPE_OF)})"
RELATION = r"to the left of|to the right of|above|below"


def holds(rel, a, b):
    """Is a <rel> b, by coordinates (y points down), along the axis where they are further apart?"""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    return {"to the left of": dx < 0 and abs(dx) > abs(dy), "to the right of": dx > 0 and abs(dx) > abs(dy),
            "above": dy < 0 and abs(dy) >= abs(dx), "below": dy > 0 and abs(dy) >= abs(dx)}[rel]


def test_world_is_deterministic_and_splits_differ():
    other = ShapesWorld(image_size=64)
    for i in range(5):
        a, b = WORLD.scene("train", i), other.scene("train", i)
        assert a == b and WORLD.render(a).tobytes() == other.render(b).tobytes()
        assert WORLD.caption(a, random.Random(i)) == other.caption(b, random.Random(i))
    img = WORLD.render(WORLD.scene("train", 0))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert WORLD.scene("train", 0) != WORLD.scene("val", 0) != ShapesWorld(seed=1).scene("val", 0)
    assert WORLD.single("val", 3, "red", "triangle")["objects"][0]["shape"] == "triangle"


def test_held_out_only_in_val_and_scene_statistics():
    held = set(WORLD.held_out)
    counts, seen_val = collections.Counter(), set()
    for i in range(3000):
        objects = WORLD.scene("train", i)["objects"]
        counts[len(objects)] += 1
        assert not {(o["colour"], o["shape"]) for o in objects} & held
        for a, b in itertools.combinations(objects, 2):  # no overlaps, and no diagonal relation to guess at
            assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) * 64 > a["r"] + b["r"]
            assert abs(abs(a["x"] - b["x"]) - abs(a["y"] - b["y"])) > 0.05
        seen_val |= {(o["colour"], o["shape"]) for o in WORLD.scene("val", i)["objects"]}
    assert held <= seen_val  # evaluation does see the held-out compositions
    assert counts[1] > counts[2] > counts[3] > 0 and counts[1] > 1200


def test_render_draws_the_scene():
    for i in range(40):
        scene = WORLD.scene("val", i)
        img = WORLD.render(scene).astype(int)
        for o in scene["objects"]:  # the centre pixel has the object's colour (up to grain)
            centre = img[int(o["y"] * 64), int(o["x"] * 64)]
            assert np.abs(centre - WORLD.RGB[o["colour"]]).max() < 20, (o, centre)
        assert img[img.sum(-1) > 600].shape[0] > 64 * 64 * 0.5  # a light ground covers most of the image


def test_shapes_have_their_areas():
    # area / r^2 of each shape as drawn: a circle; a square of half-side 0.72 r; a triangle of circumradius r;
    # a cross of two 1.9 r x 0.6 r bars
    expected = {"circle": math.pi, "square": 4 * 0.72**2, "triangle": 3 * math.sqrt(3) / 4,
                "cross": 2 * 1.9 * 0.6 - 0.6**2}
    world = ShapesWorld(image_size=128)
    for shape, ratio in expected.items():
        for j in range(4):
            scene = world.single("val", j, "blue", shape)
            img, (o,) = world.render(scene).astype(float), scene["objects"]
            ground = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
            near = np.linalg.norm(img - WORLD.RGB["blue"], axis=-1) < np.linalg.norm(img - ground, axis=-1)
            ys, xs = np.nonzero(near)
            assert abs(near.sum() / (o["r"] ** 2 * ratio) - 1) < 0.07, (shape, near.sum(), o["r"] ** 2 * ratio)
            assert np.hypot(xs + 0.5 - o["x"] * 128, ys + 0.5 - o["y"] * 128).max() < o["r"] + 1.5  # inside r
            if shape == "circle":  # the whole disc is drawn, not cut off by the box around it
                assert min(np.ptp(xs), np.ptp(ys)) + 1 > 2 * o["r"] - 1.5


def test_captions_are_true():
    relations = 0
    for i in range(400):
        scene = WORLD.scene("val", i)
        caption, objects = WORLD.caption(scene, random.Random(i)), scene["objects"]
        assert caption == caption.strip() and "  " not in caption
        named = re.findall(PHRASE, caption)
        # every object is named, and every phrase names an object (its size too, when a size word is given)
        assert sorted((c, SHAPE_OF[s]) for _, c, s in named) == sorted((o["colour"], o["shape"]) for o in objects)
        for size, colour, shape in named:
            assert any((o["colour"], o["shape"], o["size"]) == (colour, SHAPE_OF[shape], SIZE_OF.get(size, o["size"]))
                       for o in objects), caption
        for c1, s1, rel, c2, s2 in re.findall(rf"({COLOUR}) (\w+) ({RELATION}) a (?:\w+ )?({COLOUR}) (\w+)", caption):
            firsts = [o for o in objects if (o["colour"], o["shape"]) == (c1, SHAPE_OF[s1])]
            seconds = [o for o in objects if (o["colour"], o["shape"]) == (c2, SHAPE_OF[s2])]
            assert any(holds(rel, a, b) for a in firsts for b in seconds), (caption, objects)
            relations += 1
    assert relations > 100


def test_questions_match_the_scene():
    kinds = collections.Counter()
    for i in range(600):
        scene = WORLD.scene("val", i)
        objects = scene["objects"]
        for q, a in WORLD.questions(scene, random.Random(i)):
            assert a in WORLD.answers()
            if q == "how many objects are there?":
                kind, ok = "count", a == str(len(objects))
            elif m := re.fullmatch(r"what colour is the (\w+)\?", q):
                same = [o for o in objects if o["shape"] == m[1]]
                kind, ok = "colour", len(same) == 1 and same[0]["colour"] == a
            elif m := re.fullmatch(rf"is there a ({COLOUR}) (\w+)\?", q):
                present = any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects)
                kind, ok = a, a == ("yes" if present else "no")
            elif m := re.fullmatch(rf"which shape is ({RELATION}) the ({COLOUR}) (\w+)\?", q):
                ref = [o for o in objects if o["colour"] == m[2] and o["shape"] == m[3]]
                hits = [o for o in objects if o is not ref[0] and holds(m[1], o, ref[0])]
                kind, ok = "which", len(ref) == 1 and len(hits) == 1 and hits[0]["shape"] == a
            else:
                raise AssertionError(f"unknown question {q!r}")
            assert ok, (q, a, objects)
            kinds[kind] += 1
    assert kinds["which"] > 50 and kinds["colour"] > 300 and 0.4 < kinds["yes"] / (kinds["yes"] + kinds["no"]) < 0.6


def test_vocabulary_covers_everything():
    tok = Tokenizer([*SPECIALS, *WORLD.vocabulary()])  # whole words only: anything missing would be [UNK]
    rng = random.Random(0)
    texts = [t.format(f"{c} {s}") for t in WORLD.prompt_templates for c in WORLD.COLOURS for s in WORLD.SHAPES]
    for i in range(300):
        scene = WORLD.scene("val", i)
        texts += [WORLD.caption(scene, rng)] + [q + " " + a for q, a in WORLD.questions(scene, rng)]
    ids, _ = tok.encode(texts, 40)
    assert (ids != tok.unk_id).all()
    assert 5 <= len(WORLD.prompt_templates) <= 7 and all("{}" in t for t in WORLD.prompt_templates)


def test_synthetic_sources():
    tok = Tokenizer.from_corpus(WORLD.vocabulary())
    pairs, images, texts = (SyntheticPairs(WORLD, "train", tok, 16), SyntheticImages(WORLD, "train"),
                            SyntheticTexts(WORLD, "train", tok, 16))
    p, im, t = pairs[7], images[7], texts[7]
    assert p["image"].shape == (3, 64, 64) and p["image"].dtype == torch.uint8 and p["ids"].shape == (16,)
    assert set(p) == {"image", "ids", "attn"} and set(im) == {"image"} and set(t) == {"ids", "attn"}
    assert not torch.equal(p["image"], im["image"])  # images-only scenes are not the pairs' scenes
    assert torch.equal(pairs[7]["image"], p["image"]) and torch.equal(pairs[7]["ids"], p["ids"])
    assert len(pairs) >= 2**31 - 1


# -----------------------------------------------------------------------------
# image transforms


def modes():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    p_alpha = rgb.convert("P")
    p_alpha.info["transparency"] = 0
    return {"RGB": rgb, "L": rgb.convert("L"), "LA": rgb.convert("LA"), "P": rgb.convert("P"), "P+alpha": p_alpha,
            "RGBA": rgb.convert("RGBA"), "CMYK": rgb.convert("CMYK"), "1": rgb.convert("1"),
            "I;16": Image.fromarray(np.full((30, 40), 40000, np.uint16)), "I": rgb.convert("I"),
            "F": rgb.convert("F"), "1x1": Image.new("RGB", (1, 1), (9, 9, 9)),
            "3000x20": Image.new("L", (3000, 20), 50), "20x3000": Image.new("RGBA", (20, 3000))}


@pytest.mark.parametrize("train", [True, False])
def test_every_mode_and_shape(train):
    for name, img in modes().items():
        out = image_transform(img, 24, train, random.Random(0))
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8, name


def test_bit_depths_and_transparency(tmp_path):
    mid = Image.fromarray(np.full((20, 20), 32768, np.uint16))  # mid-grey at 16 bits
    mid.save(tmp_path / "mid16.png")
    assert Image.open(tmp_path / "mid16.png").mode.startswith("I")
    for img in [mid, Image.open(tmp_path / "mid16.png"), Image.fromarray(np.full((20, 20), 0.5, np.float32))]:
        out = image_transform(img, 8, False)
        assert (out.float() - 127.5).abs().max() <= 1.5, out.unique()  # not clipped to white
    clear = image_transform(Image.new("RGBA", (10, 10), (255, 0, 0, 0)), 8, False)
    assert (clear == 128).all()  # transparent pixels sit on the neutral grey, not black
    solid = image_transform(Image.new("RGBA", (10, 10), (255, 0, 0, 255)), 8, False)
    assert solid[0].min() == 255 and solid[1].max() == 0


def test_crops():
    strip = np.zeros((30, 90, 3), np.uint8)
    strip[:, :30, 0], strip[:, 30:60, 1], strip[:, 60:, 2] = 255, 255, 255
    out = image_transform(Image.fromarray(strip), 16, False)  # evaluation: the central square only
    inner = out[:, :, 1:-1]  # the outermost columns blend with their neighbours in the bicubic filter
    assert (inner[1] == 255).all() and (inner[0] == 0).all() and (inner[2] == 0).all()
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(10, 400), rng.randint(10, 400)
        x0, y0, x1, y1 = data._crop_box(w, h, True, rng)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        if 0.8 < w / h < 1.25:  # FLAVA's crop: 90-100% of the area, aspect in [3/4, 4/3]
            assert (x1 - x0) * (y1 - y0) >= 0.89 * w * h and 0.74 < (x1 - x0) / (y1 - y0) < 1.35


def test_large_jpeg_uses_draft(tmp_path, monkeypatch):
    """A 3000 x 2000 JPEG read for 32 px is decoded at 1/8 scale (JPEG's draft mode), never at full size."""
    Image.new("RGB", (3000, 2000), (200, 30, 30)).save(tmp_path / "big.jpg", quality=80)
    decoded, transform = [], data.image_transform
    monkeypatch.setattr(data, "image_transform", lambda img, *a: decoded.append(img.size) or transform(img, *a))
    out = read_image(tmp_path / "big.jpg", 32, True)
    assert decoded == [(375, 250)] and out.shape == (3, 32, 32) and abs(int(out[0].float().mean()) - 200) < 5


# -----------------------------------------------------------------------------
# file datasets


def good_png(path, colour=(255, 0, 0), size=(24, 20)):
    Image.new("RGB", size, colour).save(path)


BAD_FILES = ["zero.png", "truncated.png", "text.png", "random.png", "missing.png", "bomb_warn.png", "bomb_err.png"]


@pytest.fixture
def pairs_dir(tmp_path, monkeypatch):
    """A manifest folder with good images, every kind of unreadable file, and a file outside it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # small images can play decompression bombs
    root = tmp_path / "set"
    root.mkdir()
    for name in ["a.png", "b.png", "c.png"]:
        good_png(root / name)
    good_png(tmp_path / "outside.png")
    (root / "zero.png").write_bytes(b"")
    png = (root / "a.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "text.png").write_text("not an image")
    (root / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    good_png(root / "bomb_warn.png", size=(80, 80))  # 6,400 px: Pillow only warns; we refuse
    good_png(root / "bomb_err.png", size=(120, 120))  # 14,400 px: Pillow raises
    return root


def test_pairs_manifest_skips_every_bad_row_and_file(pairs_dir):
    rows = [(json.dumps({"image": "a.png", "caption": "a red picture"}), None),
            *[(json.dumps({"image": n, "caption": f"bad file {n}"}), None) for n in BAD_FILES],
            (json.dumps({"image": "b.png", "caption": "another red picture"}), None),
            (json.dumps({"image": "../outside.png", "caption": "x"}), "escapes"),
            (json.dumps({"image": "/etc/hostname", "caption": "x"}), "escapes"),
            (json.dumps({"image": "c.png", "caption": "  \t "}), "blank caption"),
            ('{"image": "c.png", "caption": ', "malformed JSON"),
            (json.dumps({"img": "c.png", "text": "x"}), "wrong keys"),
            (json.dumps(["c.png", "a list"]), "wrong keys"),
            (json.dumps({"image": 3, "caption": "x"}), "wrong types"),
            (json.dumps({"image": "c.png", "caption": ["x"]}), "wrong types"),
            ("   ", None),  # a blank line is not a row
            (json.dumps({"image": "sub/../c.png", "caption": "the last good one"}), None)]
    (pairs_dir / "pairs.jsonl").write_text("\n".join(r for r, _ in rows) + "\n")
    tok = Tokenizer.from_corpus(["a red picture", "another red picture"])
    ds = FilePairs(pairs_dir / "pairs.jsonl", 16, tok, 12, train=False)
    expected = {n: why for n, (_, why) in enumerate(rows, 1) if why}
    assert ds.num_skipped == len(expected) == 8 and len(ds) == 3 + len(BAD_FILES)
    assert {n for n, _ in ds.skipped} == set(expected)
    assert all(expected[n] in why for n, why in ds.skipped), ds.skipped
    skipped = {}
    for i in range(len(ds)):
        sample = ds.load(i)  # a bad file gives the next good sample, and says what it skipped
        assert sample["image"].shape == (3, 16, 16) and (sample["image"][0] == 255).all()
        skipped.update(sample["skipped"])
    assert sorted(Path(p).name for p in skipped) == sorted(BAD_FILES)
    assert "Bomb" in skipped[str(pairs_dir / "bomb_warn.png")] and "Bomb" in skipped[str(pairs_dir / "bomb_err.png")]
    second = ds.load(1)  # row 2 is zero.png: the next good row is b.png, after all seven bad files
    assert tok.decode(second["ids"]) == "another red picture" and len(second["skipped"]) == len(BAD_FILES)
    batch_source, batch = collate([{**second, "source": "pairs"}, {**ds.load(0), "source": "pairs"}])
    assert batch_source == "pairs" and batch["image"].shape == (2, 3, 16, 16) and len(batch["skipped"]) == 7


def test_csv_manifest_and_clear_errors(pairs_dir):
    tok = Tokenizer.from_corpus(["a red picture, very red"])
    (pairs_dir / "pairs.csv").write_text('image,caption,extra\na.png,"red, very red",1\nb.png,,2\nc.png\n')
    ds = FilePairs(pairs_dir / "pairs.csv", 8, tok, 8)
    assert len(ds) == 1 and ds.num_skipped == 2 and tok.decode(ds[0]["ids"]) == "red , very red"
    (pairs_dir / "nocap.csv").write_text("image,text\na.png,x\n")
    with pytest.raises(ValueError, match="caption"):
        FilePairs(pairs_dir / "nocap.csv", 8, tok, 8)
    (pairs_dir / "allbad.jsonl").write_text('{"image": "../x.png", "caption": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="allbad.jsonl"):
        FilePairs(pairs_dir / "allbad.jsonl", 8, tok, 8)
    (pairs_dir / "unreadable.jsonl").write_text("".join(json.dumps({"image": n, "caption": "x"}) + "\n"
                                                       for n in ["zero.png", "text.png", "missing.png"]))
    with pytest.raises(RuntimeError, match="FilePairs.*no usable sample near index 2"):
        FilePairs(pairs_dir / "unreadable.jsonl", 8, tok, 8).load(2)
    for make, name in [(lambda p: FilePairs(p, 8, tok, 8), "no.jsonl"), (lambda p: ImageFolder(p, 8), "nodir"),
                       (lambda p: TextFile(p, tok, 8), "no.txt")]:
        with pytest.raises(FileNotFoundError, match=name):
            make(pairs_dir / name)


def test_image_folder(tmp_path):
    for cls, names in [("red_circle", ["1.png", "2.jpg"]), ("blue_square", ["x.png", "sub/y.png"])]:
        for name in names:
            (tmp_path / cls / name).parent.mkdir(parents=True, exist_ok=True)
            good_png(tmp_path / cls / name, colour=(255, 0, 0) if cls == "red_circle" else (0, 0, 255))
    (tmp_path / ".cache").mkdir()
    (tmp_path / "readme.txt").write_text("not a class")
    (tmp_path / "red_circle" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, 16, train=False)
    assert ds.classes == ["blue square", "red circle"] and len(ds) == 4
    for i in range(4):
        sample = ds[i]
        assert sample["image"][2 if sample["label"] == 0 else 0].min() > 250  # blue images are class 0
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / ".cache", 16)


def test_text_file(tmp_path):
    tok = Tokenizer.from_corpus(["hello world, last line"])
    raw = b"hello world\n\n   \nbad \xff\xfe bytes\n" + b"hello " * 4200 + b"\n\nlast line"
    (tmp_path / "t.txt").write_bytes(raw)
    ds = TextFile(tmp_path / "t.txt", tok, 16)
    assert len(ds) == 4
    assert tok.decode(ds[0]["ids"]) == "hello world" and "\ufffd" in ds.lines[1]
    assert ds[2]["attn"].all() and ds[2]["ids"].shape == (16,) and tok.decode(ds[3]["ids"]) == "last line"
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="blank.txt"):
        TextFile(tmp_path / "blank.txt", tok, 16)


# -----------------------------------------------------------------------------
# mixing and sampling


PROBS = {"pairs": 0.7, "images": 0.15, "texts": 0.15}


def test_source_proportions_and_validation():
    sampler = MixtureBatchSampler({"pairs": 100, "images": 50, "texts": 10**9}, PROBS, 8, seed=3)
    counts = collections.Counter(sampler.source_at(t) for t in range(20000))
    for source, p in PROBS.items():
        assert abs(counts[source] / 20000 - p) < 0.015, counts
    only = MixtureBatchSampler({"pairs": 10, "images": 10, "texts": 10}, {"pairs": 2.0, "images": 0.0, "web": 5.0}, 4)
    assert {only.source_at(t) for t in range(200)} == {"pairs"}  # zero, unlisted (texts) and absent (web): never
    with pytest.raises(ValueError, match="global_batch=6.*world_size=4"):
        MixtureBatchSampler({"pairs": 10}, PROBS, 6, rank=0, world_size=4)


def steps(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_agree_and_partition_the_global_batch(world_size):
    sizes = {"pairs": 40, "images": 11, "texts": 2**31 - 1}  # pairs: whole batches per epoch
    single = steps(MixtureBatchSampler(sizes, PROBS, 8, seed=5), 60)
    ranks = [steps(MixtureBatchSampler(sizes, PROBS, 8, rank=r, world_size=world_size, seed=5), 60)
             for r in range(world_size)]
    for t in range(60):
        assert len({b[0][0] for b in (r[t] for r in ranks)}) == 1  # every rank draws the same source
        assert all(len(r[t]) == 8 // world_size for r in ranks)
        assert sum((r[t] for r in ranks), []) == single[t]  # rank slices add up to the one-process batch
        if single[t][0][0] != "images":  # images has 11 < 8 * 2: a step may wrap into the next epoch
            assert len({i for _, i in single[t]}) == 8  # so the ranks' indices are disjoint


def test_epochs_are_permutations():
    sampler = MixtureBatchSampler({"pairs": 10}, {"pairs": 1.0}, 5, seed=0)
    stream = [i for batch in steps(sampler, 8) for _, i in batch]  # 4 epochs of 10
    epochs = [stream[e * 10: (e + 1) * 10] for e in range(4)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and len({tuple(e) for e in epochs}) == 4


def test_resume_reproduces_the_stream():
    sizes = {"pairs": 23, "images": 7, "texts": 5}
    for rank in range(2):
        full = steps(MixtureBatchSampler(sizes, PROBS, 6, rank=rank, world_size=2, seed=1), 80)
        resumed = MixtureBatchSampler(sizes, PROBS, 6, rank=rank, world_size=2, seed=1, start_step=37)
        assert steps(resumed, 43) == full[37:]
    bounded = MixtureBatchSampler(sizes, PROBS, 6, seed=1, start_step=5, steps=9)
    assert len(list(bounded)) == 4


def test_loader_workers_match_main_process():
    world = ShapesWorld(image_size=32)
    tok = Tokenizer.from_corpus(world.vocabulary())
    mixture = Mixture({"pairs": SyntheticPairs(world, "train", tok, 16), "images": SyntheticImages(world, "train"),
                       "texts": SyntheticTexts(world, "train", tok, 16)})
    sizes = {k: len(v) for k, v in mixture.sources.items()}
    batches = []
    for workers in (0, 2):
        sampler = MixtureBatchSampler(sizes, PROBS, 8, seed=2, steps=10)
        batches.append(list(make_loader(mixture, sampler, num_workers=workers)))
    assert len(batches[0]) == 10 and {s for s, _ in batches[0]} >= {"pairs"}
    for (s0, b0), (s1, b1) in zip(*batches):
        assert s0 == s1 and b0.keys() == b1.keys() and b0["skipped"] == b1["skipped"] == []
        assert all(torch.equal(b0[k], b1[k]) for k in ("image", "ids", "attn") if k in b0)
        assert ("image" in b0) == (s0 != "texts") and ("ids" in b0) == (s0 != "images")
        if "image" in b0:
            assert b0["image"].shape == (8, 3, 32, 32) and b0["image"].dtype == torch.uint8

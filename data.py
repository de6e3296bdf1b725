"""What goes in: the text tokenizer, the image transforms, the three kinds of source, and one source per step.

FLAVA (arXiv 2112.04482) §3.4 trains on three kinds of data at once, image-text pairs (PMD), images alone
(ImageNet) and text alone (CCNews + BookCorpus), and draws each update's whole batch from one of them (0.70 /
0.15 / 0.15). This file follows that: BERT's WordPiece tokenizer (FLAVA's text side), the image transforms of
FLAVA's public code (a random-resized crop with scale (0.9, 1.0) for training; resize and centre crop for
evaluation), the synthetic sources, then the one idea of the pipeline, MixtureBatchSampler: per step one
source, the same on every rank, and this rank's slice of the global batch. Images come out as uint8
(3, H, W): the model normalises them and the step computes its image-tokenizer targets itself.

Each kind of source exists three ways: in the embedded synthetic world (shapes.py: captioned scenes of coloured
shapes, deterministic, no downloads), as files on disk (manifests.py: a JSONL/CSV manifest of pairs, an image
folder tree, a text file), and, for pairs, as web-scale tar shards streamed (shards.py).

    python data.py                      # draws 64 scenes to shapes_world.png and prints captions
    python -m pytest tests/test_data.py tests/test_manifests.py tests/test_shards.py
"""
import bisect
import collections
import functools
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import bert_words

SOURCES = ("pairs", "images", "texts")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # in the order of Tokenizer.special_ids
PROMPTS = ("a {}.", "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "there is a {}.")  # zero-shot

# ---------------------------------------------------------------------------------------------
# Tokenizer: BERT's WordPiece (arXiv 1810.04805), written out; the words come from bert_words.py
# ---------------------------------------------------------------------------------------------


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
    def from_corpus(cls, texts, vocab_size=4096):  # a vocabulary built here (no BERT vocab.txt given)
        """Every character seen (word-initial and '##'), then frequent words, then frequent '##' suffixes.
        Characters are all kept, even past vocab_size, so text of seen characters never has an [UNK]."""
        counts = collections.Counter(w for text in texts for w in bert_words.words(text))
        chars = sorted({c for w in counts for c in w})
        vocab = [*SPECIALS, *chars, *("##" + c for c in chars)]  # specials first: ids 0-4 in every vocabulary
        room = max(0, vocab_size - len(vocab))
        ranked = lambda counter: sorted(counter, key=lambda k: (-counter[k], k))  # noqa: E731 (deterministic)
        words = [w for w in ranked(counts) if len(w) > 1]  # (one-character words are already characters)
        kept = words[: room - room // 4]  # a quarter of the room for suffixes of the words left out
        suffixes = collections.Counter()
        for w in words[len(kept):]:
            for i in range(1, len(w) - 1):
                suffixes["##" + w[i:]] += counts[w]
        pieces = [p for p in ranked(suffixes) if suffixes[p] > 1][: room - len(kept)]
        kept += words[len(kept): room - len(pieces)]
        return cls(vocab + kept + pieces)

    @classmethod
    def from_vocab_file(cls, path):  # BERT's (and FLAVA's) vocab.txt: one word piece a line, the id is the line
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

    def _word_ids(self, raw):  # one word -> its word pieces' ids (WordPiece, arXiv 1609.08144 §4.1)
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
            for word in bert_words.words(text):  # lazy: a 25,000-character line stops early
                pieces += self._word_ids(word)
                if len(pieces) >= length - 1:
                    break
            rows.append(pieces[: length - 1] + [self.sep_id])  # truncation keeps [SEP]
        ids = torch.tensor([row + [self.pad_id] * (length - len(row)) for row in rows]).reshape(-1, length)  # (B, L)
        return ids, ids != self.pad_id  # (B, L): lower-cased text can never spell "[PAD]", so this is exact

    def decode(self, ids):  # for figures and tests: ids -> text without specials
        tokens = [self.vocab[i] for i in (ids.tolist() if torch.is_tensor(ids) else ids) if i not in self.special_ids]
        return " ".join(tokens).replace(" ##", "")  # a '##' piece continues the word before it

# ---------------------------------------------------------------------------------------------
# Image transforms (FLAVA's public code: random-resized crop for training)
# ---------------------------------------------------------------------------------------------


def to_rgb(img):
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


def _crop_box(w, h, train, rng):  # -> (left, top, right, bottom) in pixels
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
    img = to_rgb(img)
    box = (0, 0, *img.size) if squash and not train else _crop_box(*img.size, train, rng or random)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)  # crop and resize in one resampling
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (3, size, size)


# ---------------------------------------------------------------------------------------------
# The three kinds of source, synthetic (files: manifests.py; tar shards: shards.py)
# ---------------------------------------------------------------------------------------------


class SyntheticPairs:
    """Captioned scenes of shapes.ShapesWorld: the paired source (FLAVA's PMD). Effectively infinite."""

    # each source reads its own scenes, from its own offset: an image-only step never shows a paired step's scene
    offset, keys = 0, ("image", "ids", "attn")

    def __init__(self, world, split, tokenizer=None, text_len=None):
        self.world, self.split, self.tokenizer, self.text_len = world, split, tokenizer, text_len

    def __len__(self):
        return 2**31 - 1  # effectively infinite: the sampler's epochs never repeat a scene in a short run

    def load(self, i):
        scene, out = self.world.scene(self.split, self.offset + i), {}
        if "image" in self.keys:
            out["image"] = torch.from_numpy(self.world.render(scene)).permute(2, 0, 1)  # (3, H, W), contiguous
        if "ids" in self.keys:
            rng = random.Random(f"{self.world.seed}/{self.split}/{self.offset + i}/caption")  # a scene's caption is fixed
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

# ---------------------------------------------------------------------------------------------
# One source per step, the same on every rank (FLAVA §3.4)
# ---------------------------------------------------------------------------------------------


class Mixture(torch.utils.data.Dataset):
    """Named datasets behind one index: mixture[(source, index)] -> that sample, plus "source". A key
    (source, index, seed) also seeds the sample's random crop, so that it is the same in any process.
    One DataLoader over a Mixture serves every map-style source: its workers need not know which is asked."""

    def __init__(self, sources):
        self.sources = dict(sources)

    def __getitem__(self, key):
        source, index, *seed = key
        if seed and getattr(self.sources[source], "crops", False):  # the file datasets crop at random
            return {**self.sources[source].load(index, random.Random(seed[0])), "source": source}
        return {**self.sources[source][index], "source": source}


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
        # FLAVA §3.4: the step's one source, from the seed and the step alone. Every rank computes the same
        # choice without talking to the others; ranks that drew different sources would call different
        # collectives, and the run would hang.
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
            # this rank's slice of the global batch: whatever the world size, the same global batch is read
            base = drawn[source] * self.global_batch + self.rank * self.local_batch
            drawn[source] += 1
            positions = range(base, base + self.local_batch)
            indices = self.indices(source, positions)
            if self.seeds:
                yield [(source, i, f"{self.seed}/{source}/{g}") for g, i in zip(positions, indices)]
            else:
                yield [(source, i) for i in indices]


# The shuffle of every source: a keyed permutation computed, not stored, so a 2^31-row source costs no memory.
@functools.lru_cache(maxsize=64)
def _round_keys(key):  # six 64-bit round keys from the string key (cached: one key per source and epoch)
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
    half = max(1, ((int(n) - 1).bit_length() + 1) // 2)  # bits per half: 2 * half bits cover n
    mask, shift, keys = np.uint64((1 << half) - 1), np.uint64(half), _round_keys(key)

    def feistel(v):  # (left, right) -> (right, left ^ F(right)): invertible whatever F is
        left, right = v >> shift, v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    y = feistel(np.asarray(x, dtype=np.uint64))  # vectorised: a batch of positions at once
    while (out := y >= n).any():  # walk the cycle until it re-enters [0, n): still a bijection of [0, n)
        y[out] = feistel(y[out])
    return y.astype(np.int64)


def collate(samples):
    """Samples of one source -> (source, batch): image uint8 (B, 3, H, W), ids (B, L), attn (B, L) bool,
    label (B,) where present, and skipped: every (path, reason) skipped on the way."""
    first = samples[0]  # every sample of a batch comes from one source (the sampler's), so one schema
    assert all(s.get("source") == first.get("source") for s in samples), "one source per batch"
    source = first.get("source") or ("texts" if "image" not in first else "pairs" if "ids" in first else "images")
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", "ids", "attn") if k in first}
    if "label" in first:
        batch["label"] = torch.tensor([s["label"] for s in samples])  # (B,)
    batch["skipped"] = [x for s in samples for x in s.get("skipped", ())]  # counted by the trainer (runlog.Log)
    return source, batch


def make_loader(mixture, batch_sampler, num_workers=0, pin_memory=False):
    """Yields (source, batch) per step; workers persist across the (endless) iteration."""
    return torch.utils.data.DataLoader(mixture, batch_sampler=batch_sampler, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=num_workers > 0)


if __name__ == "__main__":  # entry points kept from before the companions: the world's preview, and tar shards
    import shapes
    import shards

    shards.main(sys.argv[2:]) if sys.argv[1:2] == ["shards"] else shapes.main()  # python data.py [shards ...]

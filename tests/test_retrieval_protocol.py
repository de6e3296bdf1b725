"""eval.py's retrieval protocol (COCO's and Flickr30k's, on the Karpathy split): rows that share an image file
are one image with several captions; image -> text hits when any of its captions is in the top k, text -> image
looks for the caption's one image; an exact duplicate row counts once; a caption repeated word for word on
another image is right for both (it scores exactly alike). Checked on a hand-made set: 3 images, 5 captions
each, two captions shared by two images, against ranks worked out by hand.

    python -m pytest tests/test_retrieval_protocol.py
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import manifests
import eval as E
import heldout

# The captions of each image, and each distinct caption's scores (image 0, image 1, image 2): "a pet" and
# "an animal" are captions of images 0 and 1 alike.
CAPTIONS = [["a dog", "dog on grass", "brown dog", "a pet", "an animal"],
            ["a cat", "cat on sofa", "grey cat", "a pet", "an animal"],
            ["a car", "red car", "car on road", "a vehicle", "a machine"]]
SCORES = {"a dog": (0.5, 0.9, 0.1), "dog on grass": (0.6, 0.2, 0.1), "brown dog": (0.4, 0.3, 0.2),
          "a pet": (0.9, 0.8, 0.75), "an animal": (0.3, 0.3, 0.3), "a cat": (0.1, 0.7, 0.9),
          "cat on sofa": (0.1, 0.6, 0.85), "grey cat": (0.1, 0.5, 0.8), "a car": (0.1, 0.1, 0.7),
          "red car": (0.2, 0.1, 0.6), "car on road": (0.1, 0.2, 0.5), "a vehicle": (0.0, 0.1, 0.4),
          "a machine": (0.3, 0.3, 0.3)}


def hand_made():
    captions = [c for cs in CAPTIONS for c in cs]
    image_of = torch.tensor([i for i, cs in enumerate(CAPTIONS) for _ in cs])  # (15,)
    sim = torch.tensor([SCORES[c] for c in captions]).T  # (3, 15): as a model scores them, one column a row
    return sim, image_of, captions


def test_several_captions_per_image_by_hand():
    sim, image_of, captions = hand_made()
    r = E.retrieval(sim, image_of, captions, ks=(1, 2, 5, 10))
    # image -> text, the wrong captions scoring at least as high as the image's best right one:
    #   image 0: best right "a pet" 0.9, also image 1's caption but the same words, so right  -> rank 0
    #   image 1: best right "a pet" 0.8; "a dog" 0.9 above it                                  -> rank 1
    #   image 2: best right "a car" 0.7; the three cat captions and "a pet" twice (two rows)     -> rank 5
    assert [r[f"i2t_r{k}"] for k in (1, 2, 5, 10)] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])
    # text -> image, each of the 15 rows against its own image, ties with another image counting against it:
    #   image 0's rows: 1 0 0 0 2 ("an animal" ties all three); image 1's: 1 1 1 1 2; image 2's: 0 0 0 0 2
    assert [r[f"t2i_r{k}"] for k in (1, 2, 5)] == pytest.approx([7 / 15, 12 / 15, 1.0])
    # The old protocol, one pair a row with the repeated captions left as ties, finds nothing at R@1 for image
    # 0 (its "a pet" ties with image 1's row of the same words) and ranks image 1 below "a dog" and that tie.
    one_caption_each = E.recall_at_k(sim, (1, 2), image_of[None, :] == torch.arange(3)[:, None])
    assert one_caption_each == pytest.approx({1: 0.0, 2: 1 / 3})


def test_one_pair_per_row_is_the_diagonal_case():
    """Without image_of, caption t belongs to image t: the square case that the synthetic world gives."""
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(40, 40, generator=gen) + 3 * torch.eye(40)  # (I, T): the diagonal mostly wins
    rank_i2t = (sim > sim.diagonal()[:, None]).sum(1)  # (I,) no ties among random floats
    rank_t2i = (sim.T > sim.diagonal()[:, None]).sum(1)  # (T,)
    expected = {f"{d}_r{k}": (rank < k).float().mean().item() for d, rank in (("i2t", rank_i2t), ("t2i", rank_t2i))
                for k in (1, 5)}
    assert E.retrieval(sim, ks=(1, 5)) == pytest.approx(expected) and expected["i2t_r1"] > 0.5


def test_rows_are_grouped_by_image_file(tmp_path):
    """A manifest of 3 images x 5 captions, one row duplicated, and a broken image with 2 captions: one image
    per file (each file read once), duplicates once, the broken image's captions dropped with it."""
    rows = []
    for i, caps in enumerate(CAPTIONS):
        Image.new("RGB", (20, 16), (80 * i, 40, 200 - 60 * i)).save(tmp_path / f"{i}.png")
        rows += [{"image": f"{i}.png", "caption": c} for c in caps]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.insert(7, {"image": "0.png", "caption": "brown dog"})  # an exact duplicate of row 3
    rows.insert(2, {"image": "broken.png", "caption": "a broken picture"})
    rows.append({"image": "broken.png", "caption": "still broken"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = data.Tokenizer.from_corpus([c for cs in CAPTIONS for c in cs])
    ds = manifests.FilePairs(tmp_path / "pairs.jsonl", 16, tok, 8, train=False)
    images, captions, image_of, bad = heldout.retrieval_set(ds, 100)
    assert images.shape == (3, 3, 16, 16) and bad == 1  # the broken file read once, counted once
    assert captions == [c for cs in CAPTIONS for c in cs] and image_of.tolist() == [i for i in range(3) for _ in "12345"]
    assert [int(images[i, 0, 8, 8]) for i in range(3)] == [0, 80, 160]  # image i is file i
    head, _, _, _ = heldout.retrieval_set(ds, 4)  # the first n rows only: 0.png and the broken file
    assert len(head) == 1

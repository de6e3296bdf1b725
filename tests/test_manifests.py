"""Manifests without per-process copies, and shuffling without a list (data.py): a manifest is indexed by the
byte offsets of its usable rows (8 bytes a row in one numpy array, what a DataLoader worker shares or a
spawned one receives), rows are read when asked for and equal a plain parse; every source, whatever its
size, is shuffled by a keyed bijection of [0, n) (a Feistel network with cycle walking), 2^31-row synthetic
sources included, and a resumed sampler still yields exactly the stream of an uninterrupted one.

    python -m pytest tests/test_manifests.py
"""
import csv
import io
import itertools
import json
import pickle

import numpy as np
import pytest
from PIL import Image

import data
import manifests


def test_rows_read_by_offset_equal_a_plain_parse(tmp_path):
    rows = [{"image": f"{i}.png", "caption": f"caption {i}: café 東京 " + "long " * (i % 7) * 300} for i in range(50)]
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)]
    lines[10:10] = ["", "   ", "{broken"]  # blank lines are not rows; a malformed one is skipped and counted
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())  # with a byte-order mark
    ds = manifests.FilePairs(tmp_path / "p.jsonl", 8, None, 8)
    assert len(ds) == 50 and ds.num_skipped == 1 and ds.skipped[0][0] == 13  # line numbers as in an editor
    assert [ds.pair(i) for i in range(50)] == [(str(tmp_path / r["image"]), r["caption"]) for r in rows]
    assert ds.rows.starts.dtype == np.int64 and ds.rows[-1]  # numpy offsets; a negative index reads the last row

    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["image", "caption"])
    captions = ["plain", "a caption, with a comma", 'a "quoted" one', "over\ntwo lines", "last"]
    for i, c in enumerate(captions):
        writer.writerow([f"{i}.png", c])
        if i == 1:
            buf.write("\r\n")  # a blank record between rows
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode())
    ds = manifests.FilePairs(tmp_path / "p.csv", 8, None, 8)
    assert [ds.pair(i)[1] for i in range(len(ds))] == captions and ds.num_skipped == 0


def test_an_index_costs_about_8_bytes_a_row(tmp_path):
    """What a spawned worker receives (and a forked one shares): the pickled dataset, 8 bytes a row, where
    Python lists of paths and captions were ~120 bytes a row and were copied page by page into each worker."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    n = 20_000
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps({"image": "a.png", "caption": f"a picture with the number {i}"}) + "\n" for i in range(n))
    ds = manifests.FilePairs(tmp_path / "p.jsonl", 8, None, 8)
    assert len(ds) == n and len(pickle.dumps(ds)) < 8 * n + 4096
    assert ds.pair(12_345)[1] == "a picture with the number 12345"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 100, 1000, 4097])
def test_permute_is_a_bijection_for_any_size(n):
    for key in ("a", "b/3"):
        assert sorted(data.permute(np.arange(n), n, key).tolist()) == list(range(n))


def test_permute_depends_on_its_key_and_looks_uniform():
    perms = {tuple(data.permute(np.arange(1000), 1000, f"0/pairs/{e}").tolist()) for e in range(20)}
    assert len(perms) == 20  # every epoch its own order
    first = np.array([data.permute([0], 10, str(k))[0] for k in range(4000)])
    counts = np.bincount(first, minlength=10)  # where position 0 lands: 1/10 each
    assert ((counts - 400) ** 2 / 400).sum() < 30  # chi-square, 9 degrees of freedom: p ~ 0.0005 at 30
    assert 0.07 < np.mean([data.permute([1], 10, str(k))[0] == 1 for k in range(4000)]) < 0.13


def test_huge_sources_are_shuffled_without_a_list():
    """A 2^31-row source (the synthetic ones) and a 2^62-row one: the first 20,000 positions land on distinct
    indices in range with no trace of their order, computed without a list of n positions."""
    for n in (2**31 - 1, 2**62 + 12_345):
        out = data.permute(np.arange(20_000), n, "7/pairs/0")
        assert len(set(out.tolist())) == 20_000 and out.min() >= 0 and out.max() < n
        assert abs(np.corrcoef(np.arange(20_000), out)[0, 1]) < 0.05  # the identity would be 1
        assert out.max() > n // 2  # spread over the whole range, not a prefix of it
    sampler = data.MixtureBatchSampler({"pairs": 2**31 - 1}, {"pairs": 1.0}, 500, seed=7)
    first = [i for _, i in next(iter(sampler))]
    assert first == data.permute(np.arange(500), 2**31 - 1, "7/pairs/0").tolist()


def test_a_resumed_sampler_gives_the_same_stream_on_synthetic_sizes():
    sizes, probs = {"pairs": 2**31 - 1, "images": 2**31 - 1, "texts": 2**31 - 1}, {"pairs": 0.7, "images": 0.15,
                                                                                    "texts": 0.15}
    for rank in range(2):
        full = list(itertools.islice(data.MixtureBatchSampler(sizes, probs, 6, rank, 2, seed=4, seeds=True), 30))
        resumed = data.MixtureBatchSampler(sizes, probs, 6, rank, 2, seed=4, start_step=17, seeds=True)
        assert list(itertools.islice(resumed, 13)) == full[17:]

"""Tar shards (data.py, WebDataset layout): shard specs, the writer and its check, reading every sample once
per epoch across readers (ranks x workers), the seeded shuffle buffer, exact resume of the readers (and the
documented bound when the topology changes), bad members and cut-short shards skipped and counted, a
streamed source beside map-style ones, and train.py on shards: exact resume after SIGKILL.

    python -m pytest tests/test_shards.py
"""
import collections
import io
import json
import shutil
import tarfile

import pytest
import torch
from PIL import Image

import data
import shards
import manifests
from test_reliability import ckpt, log_rows, run, run_and_die, trajectory


def make_set(folder, n=24, per_shard=6):
    """n small PNGs with the captions 'picture number i', a JSONL manifest, and shards written from it."""
    folder.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (12, 10), (10 * i, 255 - 10 * i, 90)).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture number {i}"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written, paths, left_out, bad_rows = shards.write_shards(folder / "pairs.jsonl", folder / "shards", per_shard)
    assert written == n and len(paths) == -(-n // per_shard) and left_out == [] and bad_rows == 0
    return paths, data.Tokenizer.from_corpus([r["caption"] for r in rows])


def stream(spec, tok, steps, batch=4, workers=0, rank=0, world=1, seed=0, buffer=1, state=None, start=0):
    """steps batches of rank's stream -> (captions per batch, skipped per batch, the shards.Batches)."""
    source = shards.TarShards(spec, 8, tok, 8, buffer)
    sampler = data.MixtureBatchSampler({"pairs": None}, {"pairs": 1.0}, batch * world, rank, world, seed, start)
    batches = shards.Batches(data.Mixture({"pairs": source}), sampler, workers, False, state)
    got = [next(batches)[1] for _ in range(steps)]
    return [[tok.decode(ids) for ids in b["ids"]] for b in got], [b["skipped"] for b in got], batches


def number(caption):
    return int(caption.split()[-1])


def test_shard_specs(tmp_path):
    paths, _ = make_set(tmp_path)
    folder = str(tmp_path / "shards")
    assert shards.shard_list(folder) == paths == shards.shard_list(folder + "/0000[0-9].tar")
    assert shards.shard_list(folder + "/{00001..00002}.tar") == paths[1:3]
    braced = shards.shard_list(folder + "/{00002..00005}.tar")  # 00004 and 00005 are missing: kept, counted later
    assert braced == paths[2:] + [f"{folder}/00004.tar", f"{folder}/00005.tar"]
    for spec in (folder + "/{00007..00009}.tar", str(tmp_path / "nothing"), str(tmp_path)):
        with pytest.raises(FileNotFoundError, match="no tar shard"):
            shards.shard_list(spec)


def test_writer_keeps_every_pair(tmp_path):
    paths, tok = make_set(tmp_path, n=10, per_shard=4)
    assert [len(list(shards.tar_groups(p))) for p in paths] == [4, 4, 2]
    key, group = next(shards.tar_groups(paths[1]))
    assert key == "000000004" and sorted(group) == ["png", "txt"] and group["txt"][2] == b"picture number 4"
    # JPEG bytes are copied as they are; a format the readers do not take (BMP) is re-encoded as PNG
    Image.new("RGB", (12, 10), (200, 30, 60)).save(tmp_path / "a.jpg", quality=70)
    Image.new("RGB", (12, 10), (20, 130, 60)).save(tmp_path / "b.bmp")
    (tmp_path / "ab.jsonl").write_text('{"image": "a.jpg", "caption": "a"}\n{"image": "b.bmp", "caption": "b"}\n')
    _, [path], _, _ = shards.write_shards(tmp_path / "ab.jsonl", tmp_path / "ab")
    (_, a), (_, b) = shards.tar_groups(path)
    assert a["jpg"][2] == (tmp_path / "a.jpg").read_bytes() and sorted(b) == ["png", "txt"]
    assert Image.open(io.BytesIO(b["png"][2])).getpixel((3, 3)) == (20, 130, 60)


@pytest.mark.parametrize("workers, world", [(0, 1), (2, 1), (0, 2)])
def test_each_epoch_reads_every_sample_once(tmp_path, workers, world):
    """4 shards of 6 over 2 readers (2 workers, or 2 ranks): the first 24 samples are the 24 pairs, once each,
    and their images are the images of their captions."""
    make_set(tmp_path)
    seen = []
    for rank in range(world):
        captions, skipped, _ = stream(tmp_path / "shards", _tok(), 6 // world, workers=workers, rank=rank, world=world)
        seen += [number(c) for b in captions for c in b]
        assert all(s == [] for s in skipped)
    assert sorted(seen) == list(range(24))
    source = shards.TarShards(str(tmp_path / "shards"), 8, _tok(), 8, buffer=1)
    sample = shards._ShardReader(source, 0, 0, 1).next_sample()
    i = number(_tok().decode(sample["ids"]))
    assert sample["image"][0].float().mean().item() == pytest.approx(10 * i, abs=1)  # red = 10 * i


def _tok():
    return data.Tokenizer.from_corpus([f"picture number {i}" for i in range(24)])


def test_shuffle_buffer_is_seeded_and_mixes_shards(tmp_path):
    make_set(tmp_path)
    order = {seed: [number(c) for b in stream(tmp_path / "shards", _tok(), 6, seed=seed, buffer=8)[0] for c in b]
             for seed in (0, 0, 1)}
    again = [number(c) for b in stream(tmp_path / "shards", _tok(), 6, seed=0, buffer=8)[0] for c in b]
    assert again == order[0] != order[1]  # the same seed, the same stream; another seed, another
    first_batch_shards = {n // 6 for n in order[0][:4]}
    assert len(first_batch_shards) > 1  # a buffer of 8 holds samples of two shards from the start
    assert collections.Counter(order[0]).most_common(1)[0][1] <= 2  # 24 draws: at most an epoch boundary apart


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(tmp_path, workers):
    """Stopped after 5 batches, its state saved; a new stream from that state gives batches 6.. exactly (the
    buffer, the shard in reading, the place in it, and with 2 workers which worker serves the next batch)."""
    make_set(tmp_path, n=30, per_shard=7)
    full, _, _ = stream(tmp_path / "shards", _tok(), 14, workers=workers, buffer=5)
    head, _, batches = stream(tmp_path / "shards", _tok(), 5, workers=workers, buffer=5)
    state = torch.load(io.BytesIO(_saved(batches.state())), weights_only=True)  # as a checkpoint holds it
    tail, _, _ = stream(tmp_path / "shards", _tok(), 9, workers=workers, buffer=5, state=state, start=5)
    assert head + tail == full and head != full[5:10]


def _saved(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_another_topology_loses_at_most_the_old_buffers(tmp_path):
    """Saved with 2 readers (2 workers) and resumed with 1, the stream restarts at the lowest place not finished
    with an empty buffer (ShardStream's bound): of the first epoch, at most the 2 samples the old buffers held
    are missed, and at most the 2 shards then in reading are read again. Buffer 1 keeps the epochs apart: 36
    samples in 6 shards, 4 batches before and, from place 2 on, 4 shards = 6 batches after."""
    make_set(tmp_path, n=36, per_shard=6)
    head, _, batches = stream(tmp_path / "shards", _tok(), 4, workers=2)
    tail, _, resumed = stream(tmp_path / "shards", _tok(), 6, workers=0, state=batches.state(), start=4)
    seen = collections.Counter(number(c) for b in head + tail for c in b)
    missed, repeated = set(range(36)) - set(seen), sum(n - 1 for n in seen.values())
    assert set(seen) <= set(range(36)) and sum(seen.values()) == (4 + 6) * 4  # real samples, full batches
    assert len(missed) <= 2 * 1 and repeated <= 2 * 6
    # ... and the resume says so, once (train.loader_for prints it and logs it), where the same topology is silent
    [note] = resumed.notes
    assert "read by 2 readers" in note and "this run has 1" in note and "not seen" in note, note
    assert stream(tmp_path / "shards", _tok(), 1, workers=2, state=batches.state(), start=4)[2].notes == []


def corrupt(paths):
    """Shard 0: the image of its second sample overwritten with junk, the caption of its fourth removed;
    shard 1 cut short in the middle of its fifth sample, shard 2 cut between two samples (tarfile itself ends
    there without a word). -> the names of what is bad."""
    members = []
    with tarfile.open(paths[0]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(paths[0], "w") as tar:
        for info, payload in members:
            if info.name == "000000003.txt":
                continue
            payload = b"junk" * (len(payload) // 4) if info.name == "000000001.png" else payload
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(paths[1]) as tar:
        cut = tar.getmember("000000010.png").offset_data + 20
    with open(paths[1], "r+b") as f:
        f.truncate(cut)
    with tarfile.open(paths[2]) as tar:
        cut = tar.getmember("000000015.png").offset  # its header: the first 3 samples stay whole
    with open(paths[2], "r+b") as f:
        f.truncate(cut)
    return {f"{paths[0]}:000000001", f"{paths[0]}:000000003", paths[1], paths[2]}


def test_bad_members_and_cut_shards_are_skipped_and_counted(tmp_path):
    paths, tok = make_set(tmp_path)
    bad = corrupt(paths)
    spec = str(tmp_path / "shards" / "{00000..00004}.tar")  # 00004.tar does not exist
    captions, skipped, _ = stream(spec, tok, 17, batch=1)  # the first epoch: 24 - 2 bad - 2 and 3 cut off
    seen = sorted(number(c) for b in captions for c in b)
    assert seen == [i for i in range(24) if i not in (1, 3, 10, 11, 15, 16, 17)]
    reasons = {name: why for s in skipped for name, why in s}
    assert set(reasons) == bad | {f"{tmp_path}/shards/00004.tar"}
    assert "no a caption" in reasons[f"{paths[0]}:000000003"] and "Image" in reasons[f"{paths[0]}:000000001"]
    assert "ReadError" in reasons[paths[1]] and "end-of-archive" in reasons[paths[2]]
    assert "FileNotFoundError" in reasons[f"{tmp_path}/shards/00004.tar"]
    assert sum(map(len, skipped)) == 5  # each counted once


def test_nothing_readable_stops_with_a_message(tmp_path):
    (tmp_path / "0.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(RuntimeError, match="no shard of 1 is readable"):
        stream(tmp_path, _tok(), 1)


def test_streamed_and_map_sources_share_the_steps(tmp_path):
    """Pairs from shards, texts from a file: every step's source is the sampler's, and the text batches are
    exactly those of a run where the pairs came from the manifest instead."""
    make_set(tmp_path)
    (tmp_path / "t.txt").write_text("".join(f"text line {i}\n" for i in range(9)))
    tok = data.Tokenizer.from_corpus([f"picture number text line {i}" for i in range(24)])
    texts = manifests.TextFile(tmp_path / "t.txt", tok, 8)
    runs = {}
    for name, pairs in (("shards", shards.TarShards(str(tmp_path / "shards"), 8, tok, 8, 2)),
                        ("manifest", manifests.FilePairs(tmp_path / "pairs.jsonl", 8, tok, 8))):
        sizes = {"pairs": None if name == "shards" else len(pairs), "texts": len(texts)}
        sampler = data.MixtureBatchSampler(sizes, {"pairs": 0.5, "texts": 0.5}, 4, seed=3, seeds=True)
        batches = shards.Batches(data.Mixture({"pairs": pairs, "texts": texts}), sampler)
        runs[name] = [next(batches) for _ in range(20)]
        assert [s for s, _ in runs[name]] == [sampler.source_at(t) for t in range(20)]
    assert {s for s, _ in runs["shards"]} == {"pairs", "texts"}
    for (s, a), (_, b) in zip(runs["shards"], runs["manifest"]):
        assert s != "texts" or torch.equal(a["ids"], b["ids"])


SHARD_ARGS = ["--steps", 8, "--ckpt_every", 4, "--image_tokenizer_steps", 2, "--shard_buffer", 5, "--p_pairs", 1.0]


def test_training_on_shards_resumes_exactly_and_counts_what_it_skips(tmp_path):
    """train.py --shards: killed in the middle of step 7 and resumed from step 4's checkpoint, the run ends
    with the weights and losses of one never stopped; the bad members and the cut shard are in the log."""
    paths, _ = make_set(tmp_path / "set")
    bad = corrupt(paths)
    args = [*SHARD_ARGS, "--shards", tmp_path / "set" / "shards", "--image_size", 16]
    run(tmp_path / "ref", *args)
    run_and_die(tmp_path / "killed", args, "step", 7)
    run(tmp_path / "killed", *args, "--resume")
    ref, got = ckpt(tmp_path / "ref"), ckpt(tmp_path / "killed")
    assert ref["step"] == got["step"] == 8 and all(torch.equal(v, got["model"][k]) for k, v in ref["model"].items())
    assert trajectory(tmp_path / "killed") == trajectory(tmp_path / "ref")
    named = {r["path"] for r in log_rows(tmp_path / "ref") if r.get("event") == "skipped_file"}
    assert named == bad and trajectory(tmp_path / "ref")[-1]["skipped_samples"] >= 3


def test_a_resume_with_another_reader_layout_says_so(tmp_path, capsys):
    """--workers sets how many readers share the shards (ranks x workers): a resume with another number continues
    (workers cannot change what a step computes), and says in one line, on the console and in the log, what the
    new layout costs of this epoch. (Before: it took the topology-change path in silence.)"""
    make_set(tmp_path / "set")
    args = [*SHARD_ARGS, "--shards", tmp_path / "set" / "shards", "--image_size", 16, "--steps", 4, "--ckpt_every", 2]
    run(tmp_path / "a", *args)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt_0000002.pt", tmp_path / "b" / "ckpt.pt")
    capsys.readouterr()
    run(tmp_path / "b", *args, "--resume", "--workers", 2)
    [line] = [s for s in capsys.readouterr().out.splitlines() if "tar shards were read by" in s]
    assert line.startswith("pairs: the checkpoint's tar shards were read by 1 readers") and "this run has 2" in line
    events = [r for r in map(json.loads, open(tmp_path / "b" / "log.jsonl")) if r.get("event") == "shard_readers"]
    assert [e["note"] for e in events] == [line] and ckpt(tmp_path / "b")["step"] == 4

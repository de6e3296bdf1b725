"""Web-scale pairs as WebDataset tar shards (FLAVA's PMD and FLIP's LAION are distributed this way), streamed with
the standard library, and the loaders of a run: the map-style sources through one DataLoader, each streamed one
through its own, the step's source deciding which serves it.

Companion of data.py and train.py (--shards). A shard is KEY.jpg|jpeg|png|webp + KEY.txt (or KEY.json with a
"caption"); readers = DataLoader workers x ranks, each shard read once per epoch by one reader, in a seeded
order (data.permute), through a seeded shuffle buffer. A reader's state is small and exact, so a resume with the
same topology continues the stream exactly; with another, at most one buffer per old reader is missed (said in
one line: Batches.notes). A bad member, a cut or missing shard is skipped, named and counted.

    python shards.py pairs.jsonl shards/ --per_shard 10000   # (also: python data.py shards ...)
    python -m pytest tests/test_shards.py
"""
import functools
import glob
import io
import json
import os
import random
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
import manifests

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
        return [self.shards[i] for i in data.permute(np.arange(n), n, f"{seed}/shards/{epoch}")]

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
        image = manifests.read_image(io.BytesIO(group[next(e for e in SHARD_IMAGES if e in group)][2]), self.image_size,
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
                if bad > manifests.MAX_SKIPS:
                    raise RuntimeError(f"{manifests.MAX_SKIPS} samples in a row are incomplete, e.g. {path}:{key}: {reason}")
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
        for _ in range(manifests.MAX_SKIPS):
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
        raise RuntimeError(f"{manifests.MAX_SKIPS} samples in a row could not be decoded, e.g. {self.pending[-1]}")


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
            name, batch = data.collate([{**reader.next_sample(), "source": self.name} for _ in range(self.local_batch)])
            batch["stream"] = (j, reader.state())
            yield name, batch


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
        self.notes = []  # what a resume on another topology changed (train.loader_for says it)
        W = max(1, num_workers)
        R, self.mine = sampler.world_size * W, range(sampler.rank * W, (sampler.rank + 1) * W)
        for name in [s for s in sampler.names if sampler.sizes[s] is None]:
            old = (states or {}).get(name) or {"batches": 0, "readers": {}, "R": R}
            readers = dict(old["readers"])
            if old["R"] != R:  # saved by another topology: see above
                start = min(readers.get(i, {"pos": i})["pos"] for i in range(old["R"]))
                readers = {j: {"pos": start + j, "taken": 0, "emitted": 0, "buffer": []} for j in range(R)}
                self.notes.append(f"{name}: the checkpoint's tar shards were read by {old['R']} readers (ranks x "
                                  f"DataLoader workers), this run has {R}: its readers restart at shard place {start} "
                                  f"with empty buffers, so up to {old['R']} x --shard_buffer samples of this epoch "
                                  "are not seen and the shards read past that place are read again")
            self.states[name] = {"batches": old["batches"], "readers": readers, "R": R}
            stream = ShardStream(mixture.sources[name], name, sampler.local_batch, sampler.seed, sampler.rank,
                                 sampler.world_size, self.states[name])
            self.streams[name] = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                                                  pin_memory=pin_memory,
                                                                  persistent_workers=num_workers > 0))
        mapped = any(sampler.sizes[s] is not None for s in sampler.names)
        self.mixture = iter(data.make_loader(mixture, sampler, num_workers, pin_memory)) if mapped else None

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

def stream_states(batches, world_size):
    """The streamed sources' reader states for a checkpoint: each rank knows only its own readers."""
    states = batches.state() if batches is not None else {}
    if world_size > 1 and states:  # every rank has the same streamed sources, so every rank is here
        parts = [None] * world_size
        dist.all_gather_object(parts, states)
        for part in parts:
            for name, state in part.items():
                states[name]["readers"].update(state["readers"])
    return states


def write_shards(manifest, out_dir, per_shard=10_000):
    """A JSONL/CSV manifest -> out_dir/00000.tar, 00001.tar, ...: usable row i becomes the sample KEY.<ext> +
    KEY.txt, KEY its number; image bytes are copied as they are (a format the readers do not take is
    re-encoded as PNG), an unreadable file is left out. Then every shard is read back and its samples
    counted. -> (samples written, shard paths, [(file, reason) left out], manifest rows skipped)"""
    rows, left_out, paths, written = manifests.FilePairs(manifest, 0, None, 0), [], [], []
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
                            data.to_rgb(img).save(buf, "PNG")
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

def main(argv=None):
    """python shards.py MANIFEST OUT_DIR --per_shard N (also: python data.py shards ...): tar shards, checked."""
    import argparse

    parser = argparse.ArgumentParser(prog="shards.py", description="WebDataset tar shards from a manifest")
    parser.add_argument("manifest", help="JSONL/CSV manifest of image-caption pairs")
    parser.add_argument("out_dir", help="where 00000.tar, 00001.tar, ... go")
    parser.add_argument("--per_shard", type=int, default=10_000, help="samples per shard")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        n, paths, left_out, bad_rows = write_shards(args.manifest, args.out_dir, args.per_shard)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"shards.py: error: {e}\n")
    print(f"wrote {n} samples into {len(paths)} shards, each read back whole; left out: {bad_rows} bad manifest "
          f"rows, {len(left_out)} unreadable images {left_out[:5]}\n"
          f"train with: --shards '{os.path.join(args.out_dir, '{00000..%05d}.tar' % (len(paths) - 1))}'")


if __name__ == "__main__":
    main()

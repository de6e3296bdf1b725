"""Datasets on disk: a JSONL/CSV manifest of image-caption pairs, an image folder tree, a text file; each indexed
by byte offset, read when asked for, and tolerant of bad rows and unreadable files.

Companion of data.py (these are the file versions of its three kinds of source) and of eval.py (held-out files).
Manifest paths are relative to the manifest's folder and may not leave it. Every row is checked once when the
dataset opens: a bad one is skipped and counted (num_skipped, the first reasons in skipped); an unreadable image
is skipped when it is read, for the next one, and named in the batch (data.collate's "skipped"). The index of a
10-million-row manifest is one numpy array, 8 bytes a row, shared by forked DataLoader workers.
Exercise it with `python -m pytest tests/test_manifests.py tests/test_data.py -k "manifest or folder or text_file"`.
"""
import array
import csv
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

import data

MAX_SKIPS = 50  # consecutive unreadable files before a dataset gives up


def read_image(path, size, train, rng=None, squash=False):
    """Open, decode fully (so a truncated file fails here, inside the caller's try) and transform."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is an error, not a warning
        with Image.open(path) as img:
            if not squash:  # (squash copies Hugging Face's pixels, so decodes at full scale as it does)
                img.draft(None, (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale while still >= size
            img.load()
            return data.image_transform(img, size, train, rng, squash)


class _SkipBadFiles:
    """load(i) reads file i; an unreadable file is skipped for i+1, i+2, ... (deterministically), and the
    sample lists every (path, reason) it skipped, so that the trainer can count them."""

    crops = True  # load takes the random crop's generator (data.Mixture passes one seeded per sample)
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

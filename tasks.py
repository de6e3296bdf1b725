"""Fine-tuning data: the datasets of finetune.py's four tasks, VQA's soft scores, the answer vocabulary, the
baselines that need no model, the batches, and the word pieces a checkpoint lacks.

Companion of finetune.py. A question manifest is JSONL, one {"image": path, "question" (or "text"): ..., "answer"
(or "label"): ...} a line, paths relative to the manifest's folder and refused if they leave it (as
manifests.FilePairs); a row may carry "answers": [...], VQAv2's ten annotator answers, scored VQA's way (Antol et al.
2015, arXiv 1505.00468: an answer given by 3 or more annotators scores 1, fewer count/3). Texts are eval.py's
`label<TAB>text` lines, or `label<TAB>text_a<TAB>text_b` for GLUE's sentence pairs. Images are a
manifests.ImageFolder. Every bad row is skipped and counted when the file opens (the first reasons kept); an
unreadable image is skipped when read, for the next row (manifests._SkipBadFiles).

Small sets of each kind are written from the synthetic world by shapes_tasks.py. Exercise it with
`python -m pytest tests/test_finetune.py`.
"""
import array
import collections
import json
import os
from pathlib import Path

import torch

import bert_words
import data
import manifests

SKIPS_KEPT = 20  # bad rows whose reason is kept (the rest are only counted)
CACHE_BYTES = 1 << 30  # decoded images a question manifest keeps, per process (64 px: 80,000 of them)

# ---------------------------------------------------------------------------------------------
# Answers: the vocabulary, VQA's soft scores, the baselines that need no model
# ---------------------------------------------------------------------------------------------


def ranked(counts, cap=0):
    """Labels most frequent first (ties by name, so every process agrees), at most cap of them (0: all)."""
    order = sorted(counts, key=lambda a: (-counts[a], a))
    return order[:cap] if cap else order


def soft_scores(answers) -> dict:
    """VQA's accuracy of each distinct answer among the annotators' answers: min(1, count / 3). (The official
    script averages this over the 10 subsets of 9 annotators; with 10 answers that changes a score by <= 0.03.)
    A row with a single answer gives it score 1."""
    counts = collections.Counter(answers)
    return {a: 1.0 if len(answers) == 1 else min(1.0, n / 3) for a, n in counts.items()}


def targets(scores: dict, vocab: dict) -> torch.Tensor:
    """Soft scores -> (A,) over the answer vocabulary; answers outside it are dropped (they can never be
    predicted, so such a row's best reachable score is below 1, as in VQAv2's 3,129-answer heads)."""
    out = torch.zeros(len(vocab))
    for a, s in scores.items():
        if a in vocab:
            out[vocab[a]] = s
    return out  # (A,)


def answer_prior(ds, answers) -> torch.Tensor:
    """(A,) the mean soft score of each answer over the rows (for one-answer rows: how often it is the answer)."""
    index, total = {a: i for i, a in enumerate(answers)}, torch.zeros(len(answers))
    rows = ds.texts()
    for _, scores in rows:
        total += targets(scores, index)
    return total / len(rows)


def prior_baselines(train_set, val_set) -> dict:
    """What a model that never looks at a val input scores: the majority answer of training ("majority"), and for
    questions the majority answer that training gave the same question text, else the overall one: the
    question-only prior ("question_prior"). VQA-scored (soft scores) where the rows have several answers."""
    overall, by_question = collections.Counter(), collections.defaultdict(collections.Counter)
    for question, scores in train_set.texts():
        top = max(scores, key=lambda a: (scores[a], a))  # the row's own answer
        overall[top] += 1
        by_question[question][top] += 1
    majority, val = ranked(overall)[0], val_set.texts()
    out = {"majority": sum(s.get(majority, 0.0) for _, s in val) / len(val), "majority_answer": majority}
    if val[0][0] is not None:  # the rows have questions
        guess = {q: ranked(c)[0] for q, c in by_question.items()}
        out["question_prior"] = sum(s.get(guess.get(q, majority), 0.0) for q, s in val) / len(val)
    return out


def top_answers(ds):
    """Each row's answer: the one with the highest soft score (ties by name)."""
    return [max(s, key=lambda a: (s[a], a)) for _, s in ds.texts()]


def answer_vocab(ds, cap=0):
    """The head's outputs: every answer the training rows give (each row's distinct answers counted once, as
    VQAv2's answer lists are built), most frequent first, at most cap."""
    return ranked(collections.Counter(a for _, s in ds.texts() for a in s), cap)


def prepare(sets, tokenizer, answers, squash):
    """Give each dataset the tokenizer, the answer ids and a published model's resizing -> one note a file that
    had bad rows (how many, and the first)."""
    notes = []
    for ds in sets:
        ds.tokenizer, ds.vocab, ds.squash = tokenizer, {a: i for i, a in enumerate(answers)}, squash
        if ds.num_skipped:
            notes.append(f"{ds.path}: skipped {ds.num_skipped} bad rows, the first at line {ds.skipped[0][0]}: "
                         f"{ds.skipped[0][1]}")
    return notes


def describe(train_set, val_set, answers):
    """What finetune.json reports of the data."""
    known = set(answers)
    return {"train_rows": len(train_set), "val_rows": len(val_set), "answers": len(answers),
            "val_rows_unseen_answer": sum(a not in known for a in top_answers(val_set)),
            "skipped_rows": {"train": train_set.num_skipped, "val": val_set.num_skipped}}


def open_task(task, train, val, image_size, text_len):
    """The train and val datasets of a task (val unaugmented); a missing or empty file raises here."""
    if task in ("vqa", "multimodal"):
        return QuestionManifest(train, image_size, text_len), QuestionManifest(val, image_size, text_len)
    if task == "image":
        return LabelledImages(train, image_size), LabelledImages(val, image_size, train=False)
    return LabelledTexts(train, text_len), LabelledTexts(val, text_len)


# ---------------------------------------------------------------------------------------------
# The datasets of the four tasks
# ---------------------------------------------------------------------------------------------


def _question_row(record: str, root: str):
    """A JSONL line -> (absolute image path, question, answers tuple), or a ValueError saying why not."""
    try:
        row = json.loads(record)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e}") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    question = row.get("question", row.get("text"))
    answers = row.get("answers") or [row.get("answer", row.get("label"))]
    if "image" not in row or question is None or answers == [None]:
        raise ValueError("wrong keys: need image, question (or text), answer (or label, or answers)")
    if not isinstance(row["image"], str) or not isinstance(question, str) or not question.strip():
        raise ValueError("image and question must be strings, the question not blank")
    answers = tuple(str(a).strip().lower() for a in answers if isinstance(a, (str, int)) and str(a).strip())
    if not answers:
        raise ValueError("no usable answer")
    file = os.path.abspath(os.path.join(root, row["image"]))  # lexical, as manifests._pair: no "../x", no "/x"
    if not file.startswith(root + os.sep):
        raise ValueError(f"path escapes the manifest's folder: {row['image']}")
    return file, question, answers


def _index(path, parse):
    """Byte offsets of the rows that parse (manifests.Rows) and the skip accounting -> (rows, skipped, count)."""
    starts, skipped, count = array.array("q"), [], 0
    with open(path, "rb") as f:
        lines = manifests._Lines(f)
        start, number = lines.pos, 0
        for line in lines:
            number += 1
            if line.strip():
                try:
                    parse(line)
                    starts.append(start)
                except ValueError as e:
                    count += 1
                    skipped += [(number, str(e))] if len(skipped) < SKIPS_KEPT else []
            start = lines.pos
    rows = manifests.Rows(path, starts)
    if not len(rows):
        raise ValueError(f"{path}: no usable rows ({count} skipped{f', e.g. line {skipped[0][0]}: {skipped[0][1]}' if skipped else ''})")
    return rows, skipped, count


class QuestionManifest(manifests._SkipBadFiles):
    """vqa and multimodal: (image, question, answers) rows of a JSONL manifest, read when asked for. Set
    `vocab` (answer -> id) and `tokenizer` before loading: a sample is image uint8 (3, S, S), ids and attn (L,),
    label (the row's top answer's id, -1 outside the vocabulary) and target (A,) soft scores."""

    crops = False  # see image()

    def __init__(self, path, image_size, text_len):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        self.root, self.image_size, self.text_len = os.path.abspath(path.parent), image_size, text_len
        self.rows, self.skipped, self.num_skipped = _index(path, lambda line: _question_row(line, self.root))
        self.path, self.tokenizer, self.vocab, self.cache, self._kinds = path, None, {}, {}, None

    def __len__(self):
        return len(self.rows)

    def row(self, i):
        return _question_row(self.rows[i], self.root)

    def name(self, i):
        return self.row(i)[0]

    def texts(self):
        """(question, soft scores) of every row, images unread: the answer vocabulary and the priors."""
        return [(q, soft_scores(a)) for _, q, a in map(self.row, range(len(self)))]

    def words(self):  # the text the vocabulary is checked against
        return [q for _, q, _ in map(self.row, range(len(self)))]

    def kinds(self):
        """Each row's kind of question, VQAv2's "answer_type" (yes/no, number, other) or a "kind" field (None
        where a row has neither) -> a list of str or None; all None: the manifest has no kinds. Read once."""
        if self._kinds is None:
            rows = (json.loads(self.rows[i]) for i in range(len(self)))
            kinds = [str(k) if isinstance(k, (str, int)) else None for k in
                     (row.get("answer_type", row.get("kind")) for row in rows)]
            self._kinds = kinds if any(k is not None for k in kinds) else []
        return self._kinds or None

    def image(self, file):
        """The image, resized to the model's size without a random crop (a question may ask about what a crop
        would cut off), decoded once: VQA asks several questions of each image (VQAv2: 5.4; shapes-vqa: 10)."""
        if file not in self.cache:
            image = manifests.read_image(file, self.image_size, False, squash=self.squash)  # (3, S, S) uint8
            if len(self.cache) * image.numel() < CACHE_BYTES:
                self.cache[file] = image
            return image
        return self.cache[file]

    def _read(self, i, rng=None):
        file, question, answers = self.row(i)
        ids, attn = self.tokenizer.encode(question, self.text_len)  # (1, L) each
        scores = soft_scores(answers)
        top = max(scores, key=lambda a: (scores[a], a))
        return {"image": self.image(file), "ids": ids[0], "attn": attn[0], "label": self.vocab.get(top, -1),
                "target": targets(scores, self.vocab)}


def encode_pair(tokenizer, a, b, length):
    """BERT's sentence-pair input [CLS] a [SEP] b [SEP] (padded) within length: the longer side loses its last
    piece until both fit, as BERT's longest-first truncation. No token types: FLAVA's text encoder folds type 0
    into its positions (pretrained.py). -> ids (L,), attn (L,) bool."""
    pieces = [[p for w in bert_words.words(t) for p in tokenizer._word_ids(w)] for t in (a, b)]
    while len(pieces[0]) + len(pieces[1]) > length - 3:
        pieces[len(pieces[1]) > len(pieces[0])].pop()
    row = [tokenizer.cls_id, *pieces[0], tokenizer.sep_id, *pieces[1], tokenizer.sep_id]
    ids = torch.tensor(row + [tokenizer.pad_id] * (length - len(row)))  # (L,)
    return ids, ids != tokenizer.pad_id


def _text_row(line):
    parts = [p.strip() for p in line.rstrip("\r\n").split("\t")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError("need label<TAB>text or label<TAB>text_a<TAB>text_b, none of them blank")
    return parts[0].lower(), parts[1], parts[2] if len(parts) == 3 else None


class LabelledTexts:
    """text: `label<TAB>text` or `label<TAB>text_a<TAB>text_b` lines (GLUE's sentence pairs), read when asked."""

    crops = False

    def __init__(self, path, text_len):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        self.path, self.text_len, self.tokenizer, self.vocab = path, text_len, None, {}
        self.rows, self.skipped, self.num_skipped = _index(path, _text_row)

    def __len__(self):
        return len(self.rows)

    def texts(self):
        return [(None, {label: 1.0}) for label, _, _ in map(_text_row, self.rows)]

    def words(self):  # the text the vocabulary is checked against
        return [" ".join(t for t in row[1:] if t) for row in map(_text_row, self.rows)]

    def kinds(self):  # one kind of row: accuracy by kind is for questions
        return None

    def __getitem__(self, i):
        label, a, b = _text_row(self.rows[i])
        if b is None:
            ids, attn = (t[0] for t in self.tokenizer.encode(a, self.text_len))  # (L,) each
        else:
            ids, attn = encode_pair(self.tokenizer, a, b, self.text_len)
        return {"ids": ids, "attn": attn, "label": self.vocab.get(label, -1)}

    def load(self, i, rng=None):
        return self[i]


class LabelledImages(manifests.ImageFolder):
    """image: a manifests.ImageFolder whose labels are ids of the training folders' class names (`vocab`), so
    that a val folder with other or fewer classes still lines up (a class training never saw: -1)."""

    skipped, num_skipped, vocab = (), 0, {}  # a folder has no rows to skip

    def __init__(self, root, image_size, train=True):
        super().__init__(root, image_size, train)
        self.path = root

    def texts(self):
        return [(None, {self.classes[k]: 1.0}) for k in self.labels]

    def words(self):  # no text
        return []

    def kinds(self):  # one kind of row: accuracy by kind is for questions
        return None

    def _read(self, i, rng=None):
        return {"image": manifests.read_image(self.files[i], self.image_size, self.train, rng, self.squash),
                "label": self.vocab.get(self.classes[self.labels[i]], -1)}


def val_batches(ds, rank, world_size, batch_size):
    """This rank's val rows (r, r + world, ...) in batches -> (batch, rows dropped, the rows kept). A row whose
    image cannot be read is dropped, never replaced by the next one as in training (it would be scored twice)."""
    mine = range(rank, len(ds), world_size)
    for i in range(0, len(mine), batch_size):
        rows = mine[i: i + batch_size]
        good = [(j, s) for j, s in zip(rows, map(ds.load, rows)) if not s.get("skipped")]
        if good:
            yield collate([s for _, s in good])[1], len(rows) - len(good), [j for j, _ in good]


def collate(samples):
    """data.collate, plus VQA's soft targets (B, A) where the samples carry them."""
    source, batch = data.collate(samples)
    if "target" in samples[0]:
        batch["target"] = torch.stack([s["target"] for s in samples])  # (B, A)
    return source, batch

def batches(ds, batch_size, rank, world_size, seed, start_step, workers=0, pin=False):
    """(source, batch) per step from step start_step on, by data.MixtureBatchSampler over the one training set: a
    fresh permutation each epoch, this rank's slice of each global batch, each crop seeded by its sample's place
    in the stream, so that a resumed run reads exactly what an uninterrupted one would, on any number of ranks."""
    sampler = data.MixtureBatchSampler({"train": len(ds)}, {"train": 1.0}, batch_size, rank, world_size, seed,
                                       start_step, seeds=True)
    return iter(torch.utils.data.DataLoader(data.Mixture({"train": ds}), batch_sampler=sampler, collate_fn=collate,
                                            num_workers=workers, pin_memory=pin, persistent_workers=workers > 0))

# ---------------------------------------------------------------------------------------------
# Words the checkpoint's vocabulary lacks
# ---------------------------------------------------------------------------------------------


def lacking_words(tokenizer, texts, mode="split", min_count=1):
    """Words of the training text the vocabulary has no single piece for, most frequent first: with mode
    "split" every word it would spell in several pieces or as [UNK] (a vocabulary built from the pretraining
    captions spells a new word letter by letter), with "unk" only those it cannot spell at all (a BERT
    vocabulary's pieces cover most words: splitting them is how BERT reads them), "none": nothing."""
    counts = collections.Counter(w for t in texts for w in bert_words.words(t))
    lacking = collections.Counter()
    for word, n in counts.items():
        ids = tokenizer._word_ids(word)
        if n >= min_count and (mode == "split" and len(ids) > 1 or mode != "none" and tokenizer.unk_id in ids):
            lacking[word] = n
    return ranked(lacking)


# The rows a new word piece needs: its input embedding and its output rows in the two text decoders.
VOCAB_ROWS = ("text_encoder.word_embed.weight", "mlm_head.decoder.weight", "mlm_head.decoder.bias",
              "mmm_text_head.decoder.weight", "mmm_text_head.decoder.bias")


def grow_rows(state, old_len, vocab_size, new_ids, generator, noise=0.1):
    """A model state with `vocab_size` rows in VOCAB_ROWS, each new piece's row the mean of the old vocabulary's
    rows plus noise of `noise` times their spread (Hewitt 2021, "Initializing new word embeddings for pretrained
    language models": at the mean a new word is an average word, in distribution for the encoder, and its
    decoder logit that of an average word, where a random row could dominate or vanish from the softmax; the
    noise tells new words apart). Rows of ids < old_len are the old ones, bit for bit."""
    state = dict(state)
    for key in VOCAB_ROWS:
        old = state[key].float()
        grown = torch.cat([old, old.new_zeros(max(0, vocab_size - len(old)), *old.shape[1:])])  # (V', ...)
        mean, spread = old[:old_len].mean(0), old[:old_len].std(0)
        for i in new_ids:
            grown[i] = mean + noise * spread * torch.randn(mean.shape, generator=generator)
        state[key] = grown.to(state[key].dtype)
    return state


def grow_vocabulary(tokenizer, texts, mode, min_count):
    """The tokenizer with the training text's lacking words appended (lacking_words) -> (tokenizer, new words)."""
    new = lacking_words(tokenizer, texts, mode, min_count)
    return data.Tokenizer(tokenizer.vocab + new), new


def grown_init(init, vocab_len, seed):
    """A checkpoint's model and config with room for vocab_len word pieces, the new ones' rows by grow_rows (the
    noise seeded, so that every rank and every baseline run grows the same rows)."""
    old, size = len(init["vocab"]), max(init["model_cfg"]["vocab_size"], vocab_len)
    state = grow_rows(init["model"], old, size, range(old, vocab_len), torch.Generator().manual_seed(seed))
    return {"model": state, "model_cfg": {**init["model_cfg"], "vocab_size": size}}

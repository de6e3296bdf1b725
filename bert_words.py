"""BERT's basic tokenizer (uncased): how a text splits into words before WordPiece cuts them into pieces, with the
ids a BERT vocab.txt (FLAVA's) expects. Control and format characters (Unicode C*, e.g. U+200B) are deleted, white
space splits, CJK ideographs are one word each, text is lower-cased, accents are stripped, and every punctuation
character (Unicode P*, and every ASCII symbol) is a word of its own (Devlin et al., arXiv 1810.04805; the rules of
BERT's BasicTokenizer, re-derived here).

Companion of data.py (data.Tokenizer calls words()). Exercise it with `python -m pytest tests/test_tokenizer.py
tests/test_pretrained.py -k tokenizer`: equal ids to BertTokenizer on 36 texts in nine scripts.
"""
import functools
import re
import unicodedata

_ASCII_WORD = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
_ASCII_CONTROLS = {c: None for c in (*range(32), 127) if chr(c) not in "\t\n\r"}  # str.translate deletes them
_SPLIT_CONTROLS = dict.fromkeys(map(ord, "\x0b\x0c\x1c\x1d\x1e\x1f\x85"))  # deleted by BERT, split on by str.split
_CJK = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2CEAF),
        (0x2F800, 0x2FA1F))  # the code point ranges of BERT's _is_chinese_char


def _strip_accents(word):
    """BERT uncased: NFD, then drop the combining marks ("café" -> "cafe")."""
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def words(text):
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

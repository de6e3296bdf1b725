"""weightfiles.py's hand-written safetensors reader on files that lie: every header is checked (its structure,
each dtype, each tensor's byte count against its shape, every offset against the file's size) before one tensor
byte is read, and each lie is refused with one ValueError line that names the file and the tensor. A header
that claims 4 TiB runs under an address-space limit, so that allocating before checking would fail the test.

    python -m pytest tests/test_weightfiles.py
"""
import json
import re
import subprocess
import sys

import pytest
import torch

import weightfiles
from conftest import ROOT


def raw_file(path, header, data=b"", length=None):
    """A .safetensors file with any header at all: 8-byte little-endian length (or `length`), JSON, bytes."""
    blob = json.dumps(header).encode()
    path.write_bytes((len(blob) if length is None else length).to_bytes(8, "little") + blob + data)
    return path


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}  # a valid first tensor before each lie
LIES = {  # case: (header, data after it, what the one line must say)
    "header is a JSON list": ([1, 2], b"", r"header is not a JSON object"),
    "entry without data_offsets": ({"ok": GOOD, "w": {"dtype": "F32", "shape": [2]}}, bytes(8),
                                   r"tensor 'w'.*data_offsets"),
    "entry is a string": ({"ok": GOOD, "w": "F32"}, bytes(8), r"tensor 'w'.*not a JSON object"),
    "negative shape": ({"ok": GOOD, "w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [8, 24]}}, bytes(24),
                       r"tensor 'w'.*shape \[-2, -2\]"),
    "end < start": ({"ok": GOOD, "w": {"dtype": "F32", "shape": [], "data_offsets": [12, 8]}}, bytes(12),
                    r"tensor 'w'.*data_offsets \[12, 8\].*end before its start"),
    "unknown dtype": ({"ok": GOOD, "w": {"dtype": "F8_E9", "shape": [1], "data_offsets": [8, 9]}}, bytes(9),
                      r"tensor 'w'.*dtype 'F8_E9'"),
    "bytes do not fit the shape": ({"ok": GOOD, "w": {"dtype": "F16", "shape": [3], "data_offsets": [8, 16]}},
                                   bytes(16), r"tensor 'w'.*\[3\] F16 is 6 bytes.*8"),
    "offsets past the end of the file": ({"ok": GOOD, "w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
                                         bytes(16), r"tensor 'w'.*ends at byte 24 of 16"),
    "offsets that are not two integers": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}},
                                          bytes(4), r"tensor 'w'.*data_offsets \[0, 4.0\]"),
    "shape that is not a list": ({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, bytes(16),
                                 r"tensor 'w'.*shape 4"),
    "metadata that is not an object": ({"__metadata__": [1], "ok": GOOD}, bytes(8), r"__metadata__"),
    "metadata that is not strings": ({"__metadata__": {"format": 1}, "ok": GOOD}, bytes(8), r"__metadata__.*strings"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_a_lying_header_is_refused_in_one_line_naming_file_and_tensor(tmp_path, case):
    header, data, says = LIES[case]
    path = raw_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ValueError) as err:
        weightfiles.read_weights(tmp_path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    assert re.search(says, message), message


def test_a_header_length_beyond_the_file_is_refused(tmp_path):
    for length in (10**6, 2**63):  # a megabyte more than there is, and 8 EiB (f.read would try to allocate it)
        path = raw_file(tmp_path / "model.safetensors", {"ok": GOOD}, bytes(8), length=length)
        with pytest.raises(ValueError, match=rf"{path}: header length {length} is more than the file's"):
            weightfiles.read_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")  # not even the 8 bytes of the length
    with pytest.raises(ValueError, match="shorter than the 8 bytes"):
        weightfiles.read_weights(tmp_path)


HUGE = """
import resource, sys
import weightfiles
with open('/proc/self/status') as f:  # what this process has mapped now (torch included), plus 2 GiB
    mapped = int(f.read().split('VmSize:')[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**31, mapped + 2**31))
try:
    weightfiles.read_weights(sys.argv[1])
except ValueError as e:
    print('ValueError:', e)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status for the address space")
def test_a_4_tib_claim_is_refused_before_anything_is_allocated(tmp_path):
    """A 4 TiB tensor in a 28-byte file: an address space of 2 GiB beyond what is mapped, so that the old reader's
    f.read(2**42) raised MemoryError; the checked one refuses the header without allocating."""
    huge = {"dtype": "F32", "shape": [2**40], "data_offsets": [8, 8 + 2**42]}
    raw_file(tmp_path / "model.safetensors", {"ok": GOOD, "huge": huge}, bytes(28))
    done = subprocess.run([sys.executable, "-c", HUGE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ValueError:"), done.stdout + done.stderr
    assert "tensor 'huge'" in done.stdout and "ends at byte 4398046511112 of 28" in done.stdout, done.stdout


def test_the_checked_reader_still_reads_an_empty_tensor_and_metadata(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
              "i": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}
    raw_file(tmp_path / "model.safetensors", header, (7).to_bytes(8, "little"))
    got = weightfiles.read_weights(tmp_path)
    assert got["e"].shape == (0, 3) and torch.equal(got["i"], torch.tensor([7])) and "__metadata__" not in got

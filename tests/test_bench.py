"""bench.py runs end to end on a tiny config: every case, the memory probe, the JSON. A benchmark is
not a test, so nothing here checks a timing. The Hugging Face peer is exercised only where
`transformers` is installed (CI installs requirements.txt alone, so there it is skipped)."""
import json
import sys

import pytest

from conftest import SMALL

ARGS = ["--preset", "tiny", "--set", *(f"{k}={v}" for k, v in SMALL.items()), "--device", "cpu", "--batch", "4",
        "--steps", "1", "--warmup", "1", "--threads", "1", "--mem", "false"]


def test_bench_runs_every_case_and_writes_json(tmp_path, capsys, monkeypatch):
    import bench

    monkeypatch.setitem(sys.modules, "transformers", None)  # as on CI: `import transformers` fails
    out = tmp_path / "bench.json"
    rows, checks = bench.main(ARGS + ["--peer", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "transformers is not installed" in printed and "| nanoFLAVA | pairs | 0.5 |" in printed
    cases = {(r["case"], r["keep"]) for r in rows}
    assert cases == {("contrastive", 1.0), ("contrastive", 0.5), ("contrastive", 0.25), ("pairs", 1.0),
                     ("pairs", 0.5), ("images", 1.0), ("texts", 1.0)}
    saved = json.loads(out.read_text())
    assert saved["batch"] == 4 and len(saved["results"]) == 7
    assert all(r["ms_median"] > 0 and r["tflops"] > 0 and r["mfu"] is None for r in saved["results"])  # no MFU on a CPU
    assert {c["name"] for c in checks} >= {"FLIP: contrastive pass, keep 0.5 vs 1.0", "FLIP: paired step, keep 0.5 vs 1.0"}


def test_memory_probe(tiny_cfg):
    """The function each fresh process runs (called in-process here: spawning costs seconds)."""
    from dataclasses import asdict

    import bench

    spec = {"cfg": asdict(tiny_cfg), "device": "cpu", "dtype": "fp32", "threads": 1, "side": "ours",
            "case": "contrastive", "keep": 0.5, "batch": 4}
    m = bench.probe(spec)
    assert not m["oom"] and m["peak"] > m["rise"] > 0  # peak RSS of the process, rise of the step


def test_bench_against_hugging_face(tmp_path):
    pytest.importorskip("transformers")
    import bench

    rows, checks = bench.main(ARGS + ["--peer", "--cases", "pairs,images,texts", "--pair_keep", "1.0",
                                      "--json", str(tmp_path / "bench.json")])
    assert {(r["model"], r["case"]) for r in rows} >= {("HF", "pairs"), ("HF", "images"), ("HF", "texts")}
    assert any(c["name"] == "vs HF: paired step, ours at keep 1.0" for c in checks)


def test_batch_max_needs_cuda():
    import bench

    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench.main(ARGS[:-2] + ["--batch", "max", "--device", "cpu"])

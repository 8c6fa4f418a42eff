"""benchmarks/run.py --quick on the tiny size: the JSON has every field, with sane values.

No timing assertions: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--sizes", "tiny", "--threads", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env={**__import__("os").environ, "SEMDIFF_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny" in proc.stdout and "denoiser pass" in proc.stdout
    return json.loads(out.read_text())


def test_machine_and_peaks(result):
    m = result["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "torch_threads", "device"):
        assert m.get(key) not in (None, ""), key
    assert result["peaks"]["float32"]["peak_gflops"] > 0
    assert result["peaks"]["float32"]["mm_gflops"] > 0 and result["peaks"]["float32"]["conv_gflops"] > 0


def test_pass_rows(result):
    rows = result["passes"]
    modes = {r["mode_name"] for r in rows}
    assert {"reference", "sdpa", "sdpa+cl"} <= modes
    assert {r["component"] for r in rows} == {"encoder pass", "denoiser pass"}
    for r in rows:
        assert r["size"] == "tiny" and r["batch"] == 1
        assert r["gflop"] > 0 and r["seconds"] > 0 and r["images_per_s"] > 0
        assert r["speedup_vs_reference"] > 0 and r["speedup_vs_reference_median"] > 0
        assert r["pct_of_peak"] > 0 and r["pct_of_mm_peak"] > 0
        assert r["peak_memory_mb"] >= 0
        if r["mode_name"] == "reference":
            assert r["speedup_vs_reference"] == 1.0
            assert r["mode"] == {"name": "reference", "attention": "reference", "dtype": "float32",
                                 "channels_last": False, "compile": None, "weights": "float32"}
    # the same arithmetic in every mode: one GFLOP count per component
    for comp in ("encoder pass", "denoiser pass"):
        assert len({r["gflop"] for r in rows if r["component"] == comp}) == 1


def test_end_to_end_rows(result):
    rows = result["end_to_end"]
    comps = {r["component"] for r in rows}
    assert "encode_stochastic (250 steps)" in comps and "decode (20 steps)" in comps
    for r in rows:
        assert r["seconds"] > 0 and r["speedup_vs_reference"] > 0 and r["passes"] >= 1
        if r["component"].startswith("decode"):
            assert r["projected"] and r["measured_steps"] < r["default_steps"]
    recon = [r for r in rows if r["component"].startswith("reconstruct")]
    assert {r["passes"] for r in recon} == {271, 31}  # official 1 + 250 + 20; fixed-point 1 + 2 x 10 + 10
    assert all(r["speedup_vs_official_reference"] > 0 for r in recon)

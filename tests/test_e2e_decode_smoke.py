"""benchmarks/e2e_decode.py's CPU smoke mode: the script itself runs end to end on tiny shapes (no timing value is
checked; the GPU run measures). The strong FP16 decoder must equal HF eager on the same weights."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _run(tmp_path, *extra):
    import e2e_decode

    out = tmp_path / "e2e.json"
    res = e2e_decode.main(["--smoke", "--out", str(out), *extra])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    return res


@pytest.mark.slow  # ~35 s of CPU time (a backend compile of a 2-layer model, lower="eager")
def test_smoke_decode_rows(tmp_path):
    """One context and batch: the strong decoder (checked against HF eager first), one sqcompile budget, the HF
    row; every row carries its floor."""
    res = _run(tmp_path, "--sections", "decode", "--batches", "1", "--bits", "2.69", "--hf-shapes", "48x1")
    assert res["checks"]["strong_ok"], res["checks"]
    rows = {r["row"]: r for r in res["rows"]}
    assert set(rows) == {"strong_fp16", "sqcompile_5.95x", "hf_inductor"}
    for r in rows.values():
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["kv_bytes"] > 0
    assert rows["sqcompile_5.95x"]["bits"] == 2.69 and rows["sqcompile_5.95x"]["cuda_decode_launches"] == 0  # CPU
    assert res["device"] == "cpu" and res["command"] and res["versions"]["torch"]


@pytest.mark.slow  # ~45 s of CPU time
def test_smoke_every_section(tmp_path):
    """All sections: decode rows, capacity (sqcompile fits more sequences than FP16 in the same budget), prefill and
    generate through sqcompile.optimize."""
    res = _run(tmp_path, "--batches", "1")  # one shape: the grid is the decode test's
    cap = res["capacity"]
    assert cap["sq_max_batch"] > 2 * cap["fp16_max_batch"] >= 2
    assert {"fp16", "sq"} <= set(cap)
    g = res["generate"]
    assert g["strong_fp16"]["tokens"] == g["new_tokens"] and g["sqcompile"]["tokens"] == g["new_tokens"], g
    assert not res["skipped"]

"""Tuned kernel configs are data (`sqcompile/kernels/configs/*.json`), looked up per device name, with the device's
SM count applied where a config depends on it, not an if-ladder with one GPU's numbers inside."""
from __future__ import annotations

import json
from pathlib import Path

import sqcompile.kernels.fused_moe as fm
from sqcompile.kernels import tuned_config

CONFIGS = Path(fm.__file__).parent / "configs"


def test_every_config_file_has_a_default_and_parses():
    files = sorted(CONFIGS.glob("*.json"))
    assert files
    for f in files:
        assert "default" in json.loads(f.read_text()), f


def test_unknown_device_gets_the_default_and_a_copy():
    a = tuned_config("fused_moe", "a GPU nobody tuned for")
    assert a == tuned_config("fused_moe", None) == tuned_config("fused_moe")
    a["decode"]["programs_per_sm"] = -1  # a caller's change never reaches the table
    assert tuned_config("fused_moe")["decode"]["programs_per_sm"] > 0


def test_moe_decode_split_follows_the_device_sm_count(monkeypatch):
    monkeypatch.setattr(fm, "_interpreting", lambda: False)
    tuned = tuned_config("fused_moe")
    # 8 experts, H = 64: 8 used tiles; split-K = programs_per_sm * SMs // tiles, at most split_k_max and inter // 512
    kw = dict(num_pairs=8, num_experts=8, hidden=64, inter=8192)
    at_tuned = fm._config(**kw)["SPLIT_K"]
    assert at_tuned == min(tuned["decode"]["split_k_max"],
                           tuned["decode"]["programs_per_sm"] * tuned["tuned_sm_count"] // 8, 8192 // 512)
    assert fm._config(**kw, sm_count=tuned["tuned_sm_count"]) == fm._config(**kw)
    assert fm._config(**kw, sm_count=8)["SPLIT_K"] == tuned["decode"]["programs_per_sm"]  # 4 * 8 SMs // 8 tiles
    assert fm._config(**kw, sm_count=1)["SPLIT_K"] == 1


def test_moe_prefill_stages_follow_shared_memory(monkeypatch):
    monkeypatch.setattr(fm, "_interpreting", lambda: False)
    got = [fm._config(1024, 8, 64, 1024, kb * 1024)["num_stages"] for kb in (100, 164, 227)]
    assert got == [2, 3, 4]
    assert fm._config(1 << 20, 8, 4096, 14336)["X_SORTED"] and not fm._config(1 << 20, 8, 4096, 1024)["X_SORTED"]

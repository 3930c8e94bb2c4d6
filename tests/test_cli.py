"""The `sqcompile` command line (sqcompile/cli.py): every subcommand's options reach it, --help needs no torch,
and a bad profile file is one clear line and a non-zero exit."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from sqcompile.cli import build_parser, main
from sqcompile.profile import SpectralProfile

ROOT = Path(__file__).resolve().parent.parent


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_subcommand_help_shows_its_options(capsys):
    text = _help(capsys, "explain")
    for option in ("--model", "--profile", "--bits", "--no-quantize", "--cache", "--prompt"):
        assert option in text, option
    text = _help(capsys, "bench")
    assert "--out" in text and "decode_attention" in text
    assert "--eval-tokens" in _help(capsys, "eval")


def test_explain_options_reach_the_command(monkeypatch, capsys, tiny_llama):
    import sqcompile.cli as cli

    seen = []

    class Tokenizer:
        def __call__(self, text, return_tensors=None):
            return {"input_ids": torch.arange(len(text.split()))[None] % tiny_llama.config.vocab_size}

    def load(name):
        seen.append(name)
        return tiny_llama, Tokenizer()

    monkeypatch.setattr(cli, "_load_model", load)
    assert main(["explain", "--model", "my-model", "--no-quantize", "--cache", "dynamic", "--prompt", "a b c d"]) == 0
    out = capsys.readouterr().out
    assert seen == ["my-model"]
    assert "2 sites, 2 rewritten" in out


def test_bench_names_an_unknown_benchmark(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["missing", "garbled", "not a profile"])
def test_inspect_bad_file_is_one_line_and_exit_2(tmp_path, capsys, damage):
    path = tmp_path / "p.safetensors"
    if damage == "garbled":
        path.write_bytes(b"\xff" * 64)
    elif damage == "not a profile":
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sqcompile inspect: ") and str(path) in err, err
    assert "Traceback" not in err


def test_inspect_good_profile_still_works(tmp_path, capsys):
    path = SpectralProfile.random(2, 2, 16, num_heads=4).save(tmp_path / "p.safetensors")
    assert main(["inspect", str(path), "--plot", str(tmp_path / "s.png"), "--bits"]) == 0
    assert "mean d_eff" in capsys.readouterr().out


@pytest.mark.skipif("spectralquant" not in entry_points(group="torch_dynamo_backends").names,
                    reason="sqcompile is not installed (pip install -e .): a checkout on PYTHONPATH registers its "
                           "backend at import, which loads torch")
def test_help_does_not_import_torch():
    code = ("import runpy, sys\n"
            "sys.argv = ['sqcompile', '--help']\n"
            "try:\n    runpy.run_module('sqcompile.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "calibrate" in r.stdout and "inspect" in r.stdout and r.stdout.strip().endswith("no torch")


def test_explain_bad_profile_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"\x00" * 16)
    assert main(["explain", "--profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sqcompile explain: "), err


@pytest.mark.parametrize("argv", [["eval", "--protocol", "decode"], ["calibrate", "--text", "hamlet", "--out", "p"],
                                  ["calibrate", "--model", "/no/such/dir", "--text", "hamlet", "--out", "p"]])
def test_no_cached_model_is_one_line_that_says_how_to_fetch(tmp_path, monkeypatch, argv):
    """The library never downloads: with nothing cached, the commands say how to fetch the model (or to pass a
    local path) in one line."""
    monkeypatch.setenv("SQCOMPILE_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("sqcompile: ") and "\n" not in msg, msg
    assert ("tests/models.py smollm2" in msg) if "/no/such" not in argv[2] else ("local model directory" in msg)
    assert not any(tmp_path.iterdir())  # nothing fetched

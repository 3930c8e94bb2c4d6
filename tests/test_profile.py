import pytest
import torch

from sqcompile.profile import SpectralProfile, model_fingerprint


def test_save_load_round_trip(tmp_path):
    p = SpectralProfile.random(3, 2, 8, num_heads=4, seed=1)
    p.tokens = 1234
    p.meta["texts"] = ["hamlet"]
    path = p.save(tmp_path / "p.safetensors")
    q = SpectralProfile.load(path)
    assert q.fingerprint == p.fingerprint
    assert q.tokens == 1234 and q.meta["texts"] == ["hamlet"]
    for name in ("key_mean", "key_eigvecs", "key_eigvals", "value_mean", "value_eigvecs", "value_eigvals"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_corrupted_file_is_a_value_error(tmp_path, damage):
    path = SpectralProfile.random(2, 2, 8).save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        path.write_bytes(b"\xff" * 64 + data[64:])
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="SpectralProfile"):
        SpectralProfile.load(path)


def test_plain_safetensors_is_not_a_profile(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a SpectralProfile"):
        SpectralProfile.load(tmp_path / "x.safetensors")


def test_fingerprint_mismatch_names_it():
    p = SpectralProfile.random(2, 2, 8, num_heads=4)
    p.check_matches({"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "num_heads": 4})
    with pytest.raises(ValueError, match=r"num_layers: profile has 2, model has 3"):
        p.check_matches({"num_layers": 3, "num_kv_heads": 2, "head_dim": 8})
    with pytest.raises(ValueError, match=r"num_kv_heads: profile has 2, model has 4.*head_dim: profile has 8, model has 16"):
        p.check_matches({"num_layers": 2, "num_kv_heads": 4, "head_dim": 16})


def test_d_eff_is_the_participation_ratio():
    p = SpectralProfile.random(1, 2, 4)
    p.key_eigvals = torch.tensor([[[4.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    d = p.d_eff("key")
    assert d.shape == (1, 2)
    assert d[0, 0].item() == pytest.approx(36 / 18)
    assert d[0, 1].item() == pytest.approx(4.0)


def test_random_bases_are_orthogonal_and_sorted():
    p = SpectralProfile.random(2, 3, 16, seed=5, mean_scale=2.0)
    for kind in ("key", "value"):
        R = p.eigvecs(kind)
        eye = torch.eye(16).expand_as(R)
        assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-5)
        lam = p.eigvals(kind)
        assert (lam[..., :-1] >= lam[..., 1:]).all()
        assert p.mean(kind).abs().mean() > 0.5


def test_bad_shapes_are_rejected():
    p = SpectralProfile.random(2, 2, 8)
    with pytest.raises(ValueError, match="key_eigvecs"):
        SpectralProfile(p.fingerprint, p.key_mean, p.key_eigvecs[..., :4], p.key_eigvals,
                        p.value_mean, p.value_eigvecs, p.value_eigvals)


def test_model_fingerprint_reads_both_rope_styles():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    fp = model_fingerprint(cfg)
    assert (fp["num_layers"], fp["num_heads"], fp["num_kv_heads"], fp["head_dim"]) == (3, 4, 2, 16)
    assert "rope_theta" in fp["rope"]
    old = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 256, "rope_theta": 5e5,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    fp = model_fingerprint(old)
    assert fp["num_kv_heads"] == 8 and fp["head_dim"] == 32
    assert fp["rope"] == {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}


def test_cli_inspect_prints_d_eff_and_writes_the_spectra_plot(tmp_path, capsys):
    from sqcompile.cli import main

    path = SpectralProfile.random(2, 2, 16, num_heads=4).save(tmp_path / "p.safetensors")
    assert main(["inspect", str(path), "--plot", str(tmp_path / "s.png"), "--bits", "4.25"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 1 |" in out and "mean d_eff" in out and "bits/elem" in out
    assert (tmp_path / "s.png").stat().st_size > 1000

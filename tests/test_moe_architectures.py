"""Every MoE causal LM the installed transformers ships gets an MoE row in `explain` for each MoE block.

The architectures are found, not listed: every config class of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` with an
expert-count field (`num_experts`, `num_local_experts`, `n_routed_experts`, `moe_num_experts`). Each is built
tiny (hidden 32, 2 layers, 4 experts, top-2; every layer an MoE layer where the config says which). The checks:

- `test_moe_block` (default, ~1 s an architecture): each distinct MoE block class (a module with an `experts`
  child) is compiled alone on hidden states [1, 6, H] under the backend (`lower="eager"`); it has exactly one MoE
  row, rewritten or left alone with a reason saying what differs from the fused op, and its output equals eager.
- `test_every_moe_layer_is_reported` (slow: the whole model, a 6-token forward): every MoE layer has a row and the
  compiled logits equal eager.
- `EXPECT_LEFT` says which architectures' MoE blocks are left alone today (and a word of why), so a regression in
  either direction fails here.

A config that cannot be built tiny (a validator this generic recipe does not satisfy) is skipped with its reason
printed; `test_moe_inventory` counts them and fails when more are skipped than `MAX_SKIPPED`.
"""
from __future__ import annotations

import logging
import re
import time
import warnings

import pytest
import torch
import transformers

from sqcompile import backend
from sqcompile.report import Report

EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOPK_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts")
# Fields set when the config has them: small sizes, every layer an MoE layer, trivial expert groups.
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, shared_expert_intermediate_size=40,
             max_position_embeddings=128, n_group=1, topk_group=1, num_expert_group=1, first_k_dense_replace=0,
             kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=16, moe_layer_start_index=0,
             expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
             decoder_sparse_step=1, mlp_only_layers=[], moe_layers=[0, 1], interleave_moe_layer_step=1,
             expert_ffn_hidden_size=24, num_shared_experts=1, n_shared_experts=1, moe_num_shared_experts=1,
             is_moe=True, enable_moe_block=True)

# MoE blocks left alone today, with a word of the reason each row must carry; every other architecture's MoE blocks
# are rewritten (the fused op, or `fused_experts` behind the model's own router).
EXPECT_LEFT = {
    "ergo": "ReLU",  # squared-ReLU experts with a post-expert norm
    "gemma4_text": "GELU",  # GELU experts beside a dense MLP
    "gpt_oss": "clamped",  # clamped SwiGLU with biases, gate/up interleaved
    "inkling2_loop_text": "tanh",
    "inkling2_text": "tanh",
    "jetmoe": "experts alone not substituted",  # per-token linears on gathered inputs
    "llama4_text": "experts(w * x)",  # the router weight scales the experts' input
    "minimax_m3_vl_text": "clamped",
    "nemotron_h": "ReLU",  # squared-ReLU experts without a gate
}
MAX_SKIPPED = 16
# Whole-model runs whose graph breaks fall inside the layers: a resumed frame's module paths carry no layer index,
# so its rows are numbered by graph order; there the check is one row per MoE layer at least.
SPLIT_LAYERS = {"jetmoe"}


def moe_architectures() -> list[tuple[str, type, str]]:
    """(model_type, config class, model class name) of every causal LM whose config has an expert count."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type, model_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        cfg_cls = getattr(transformers, CONFIG_MAPPING_NAMES.get(model_type, ""), None)
        if cfg_cls is None or not hasattr(transformers, model_name):
            continue
        fields = set(getattr(cfg_cls, "__dataclass_fields__", None) or ())
        try:
            fields |= set(cfg_cls().to_dict())
        except Exception:  # noqa: BLE001 - a config whose defaults do not validate: fields from the class only
            pass
        if fields & set(EXPERT_FIELDS):
            out.append((model_type, cfg_cls, model_name))
    return out


def tiny_config(cfg_cls):
    defaults = cfg_cls().to_dict()
    kw = {k: v for k, v in SMALL.items() if k in defaults}
    kw.update({f: 4 for f in EXPERT_FIELDS if f in defaults})
    kw.update({f: 2 for f in TOPK_FIELDS if f in defaults})
    if "kv_lora_rank" in defaults:  # multi-head latent attention: one latent per query head
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    types = defaults.get("layer_types")
    if types:  # hybrids: keep one layer of the first and one of the last kind
        kw["layer_types"] = [types[0], types[-1]]
    return cfg_cls(**kw)


def build(cfg_cls, model_name):
    """The tiny model, or the reason it cannot be built."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = tiny_config(cfg_cls)
            torch.manual_seed(0)
            model = getattr(transformers, model_name)(config).eval()
    except Exception as e:  # noqa: BLE001 - reported and counted by test_moe_inventory
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:220]}"
    with torch.no_grad():  # HF inits the fused expert weights small; make routing and experts matter
        for name, p in model.named_parameters():
            if ".experts" in name or ".gate." in name or ".router." in name:
                p.normal_(0, 0.3)
    return model, None


def moe_layers(model) -> set:
    """Layer index of every module with an `experts` child (HF's MoE blocks)."""
    out = set()
    for name, module in model.named_modules():
        if any(child == "experts" or type(m).__name__.endswith("Experts") for child, m in module.named_children()):
            m = re.search(r"layers\.(\d+)", name)
            out.add(int(m.group(1)) if m else name)
    return out


ARCHS = moe_architectures()
_skipped: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _quiet():
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield
    logging.getLogger("transformers").setLevel(level)


def test_moe_inventory():
    """How many MoE architectures were found and built; the skipped ones, with why."""
    built, skipped = [], {}
    for model_type, cfg_cls, model_name in ARCHS:
        model, why = build(cfg_cls, model_name)
        if model is None:
            skipped[model_type] = why
        else:
            built.append(model_type)
    print(f"\n{len(ARCHS)} MoE causal-LM architectures, {len(built)} built tiny, {len(skipped)} skipped:")
    for k, v in skipped.items():
        print(f"  {k}: {v}")
    assert len(ARCHS) >= 20, "the enumeration found too few MoE architectures"
    assert len(skipped) <= MAX_SKIPPED, skipped
    missing = set(EXPECT_LEFT) & set(skipped)
    assert not missing, f"architectures named in EXPECT_LEFT could not be built: {missing}"


def moe_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of the first MoE block of each class."""
    seen = {}
    for name, module in model.named_modules():
        if any(child == "experts" or type(m).__name__.endswith("Experts") for child, m in module.named_children()):
            seen.setdefault(type(module), (name, module))
    return list(seen.values())


def _check_rows(model_type, moe, report):
    for s in moe:
        assert s.rewritten or (s.reason and len(s.reason) > 20), f"{model_type}: a row without a reason\n{report}"
        if model_type in EXPECT_LEFT:
            assert not s.rewritten and EXPECT_LEFT[model_type] in s.reason, \
                f"{model_type}: expected left alone ({EXPECT_LEFT[model_type]!r})\n{report}"
        else:
            assert s.rewritten, f"{model_type}: expected rewritten (or add it to EXPECT_LEFT)\n{report}"


def compiled_with_report(fn, *args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="spectralquant", options={"quantize": False, "lower": "eager"})
    sink: list = []
    token = backend._REPORT_SINK.set(sink)
    try:
        with torch.no_grad():
            out = compiled(*args)
    finally:
        backend._REPORT_SINK.reset(token)
    return out, Report(sites=sink)


def _build_or_skip(cfg_cls, model_name):
    model, why = build(cfg_cls, model_name)
    if model is None:
        pytest.skip(f"tiny config not buildable: {why}")
    return model


def _first(out):
    out = out[0] if isinstance(out, tuple) else out
    return getattr(out, "logits", out)


@pytest.mark.parametrize("model_type,cfg_cls,model_name", ARCHS, ids=[a[0] for a in ARCHS])
def test_moe_block(model_type, cfg_cls, model_name):
    t0 = time.time()
    model = _build_or_skip(cfg_cls, model_name)
    hidden = model.config.get_text_config().hidden_size
    checked = 0
    blocks = moe_blocks(model)
    for path, block in blocks:
        x = torch.randn(1, 6, hidden, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                expected = _first(block(x))
        except Exception as e:  # noqa: BLE001 - a block that needs more than hidden states: the slow test covers it
            print(f"{model_type}: {path} ({type(block).__name__}) cannot run alone: {type(e).__name__}")
            continue
        got, report = compiled_with_report(block, x)
        moe = report.by_kind("moe")
        assert len(moe) == 1, f"{model_type}: {path}: {len(moe)} MoE rows\n{report}"
        err = ((_first(got) - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-4, f"{model_type}: {path}: compiled output differs from eager by {err:.3g}\n{report}"
        _check_rows(model_type, moe, report)
        checked += 1
        print(f"{model_type}: {path}: {'rewritten (' + str(moe[0].moe_form) + ')' if moe[0].rewritten else moe[0].reason}"
              f" ({time.time() - t0:.1f}s)")
    if not blocks:
        pytest.skip("the tiny config has no MoE block")
    if not checked:
        pytest.skip("no MoE block runs on hidden states alone (the slow whole-model test covers it)")


@pytest.mark.slow
@pytest.mark.parametrize("model_type,cfg_cls,model_name", ARCHS, ids=[a[0] for a in ARCHS])
def test_every_moe_layer_is_reported(model_type, cfg_cls, model_name):
    t0 = time.time()
    model = _build_or_skip(cfg_cls, model_name)
    truth = moe_layers(model)
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            expected = model(ids).logits
    except Exception as e:  # noqa: BLE001 - transformers' own forward of this tiny config, before any of ours
        pytest.skip(f"the tiny config's eager forward fails in transformers: {type(e).__name__}: {str(e)[:160]}")
    got, report = compiled_with_report(model, ids)
    moe = report.by_kind("moe")
    err = ((_first(got) - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-4, f"{model_type}: compiled logits differ from eager by {err:.3g}\n{report}"
    reported = {s.layer for s in moe}
    if model_type in SPLIT_LAYERS:
        assert len(moe) >= len(truth), f"{model_type}: {len(moe)} MoE rows for {len(truth)} MoE layers\n{report}"
    else:
        assert truth <= reported, f"{model_type}: MoE layers {sorted(truth - reported, key=str)} have no row\n{report}"
    _check_rows(model_type, [s for s in moe if s.layer in truth], report)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    print(f"{model_type}: {len(truth)} MoE layers, {sum(s.rewritten for s in moe)} rows rewritten "
          f"({time.time() - t0:.1f}s)")

"""The exact sink token (sqcompile.kernels.sink): put_sink, the decode ops' extra split (torch reference and
Triton under TRITON_INTERPRET=1, outputs poisoned first), and how SpectralCache finds and keeps the sink."""
from __future__ import annotations

import math

import pytest
import torch

from sqcompile.kernels import decode_attention as da
from sqcompile.kernels import decode_attention_fast as fa
from sqcompile.kernels.sink import put_sink, sink_inputs
from sqcompile.quant.fast_layout import layout_for_budget
from test_decode_attention import attention_args, make_format
from test_decode_attention import random_cache as random_planes
from test_decode_attention_fast import make_args, random_cache, rel_err


def test_put_sink_replaces_one_row_per_batch_row():
    x = torch.randn(3, 2, 5, 4)
    sink = torch.randn(3, 2, 4)
    out = put_sink(x, sink, torch.tensor([0, -1, 4]))
    assert torch.equal(out[0, :, 0], sink[0]) and torch.equal(out[0, :, 1:], x[0, :, 1:])
    assert torch.equal(out[1], x[1])  # no sink in this row
    assert torch.equal(out[2, :, 4], sink[2]) and torch.equal(out[2, :, :4], x[2, :, :4])
    with pytest.raises(ValueError, match="sink_pos"):
        put_sink(x, sink, torch.tensor([0, 1]))


def test_put_sink_replaces_every_exact_slot():
    """The slot form (the sink and the outlier tokens): sink [B, H, S, d], sink_pos [B, S]; -1 leaves x."""
    x = torch.randn(2, 2, 6, 4)
    slots = torch.randn(2, 2, 3, 4)
    out = put_sink(x, slots, torch.tensor([[0, 4, -1], [-1, 2, 5]]))
    expect = x.clone()
    expect[0, :, 0], expect[0, :, 4] = slots[0, :, 0], slots[0, :, 1]
    expect[1, :, 2], expect[1, :, 5] = slots[1, :, 1], slots[1, :, 2]
    assert torch.equal(out, expect)
    with pytest.raises(ValueError, match="sink_pos"):
        put_sink(x, slots, torch.tensor([0, 1]))


def _fast_dequant(lay, packed, fac):
    """Storage coordinates of packed rows, as the kernels read them (codes * level step * token scale)."""
    codes, scales = lay.unpack(packed)
    parts = []
    for gr, c, s in zip(lay.groups, codes, scales):
        if gr.bits == 0:
            parts.append(torch.zeros(*packed.shape[:3], gr.n))
            continue
        x = (c.float() - gr.offset) * fac.float()[None, :, None, gr.start:gr.stop]
        parts.append(x * s[..., None] if gr.stores_scale else x)
    return torch.cat(parts, -1)


def _fast_case(seed: int, B: int, Hq: int, Hkv: int, d: int, T: int):
    """A random fast-layout cache at 3.25 bits: (layouts, op arguments, packed K/V, q, key mean)."""
    gen = torch.Generator().manual_seed(seed)
    kl, vl = layout_for_budget(3.25, d)
    args = make_args(kl, vl, Hkv, gen)
    kp, vp = random_cache(kl, B, Hkv, T, gen), random_cache(vl, B, Hkv, T, gen)
    return kl, vl, args, kp, vp, torch.randn(B, Hq, d, generator=gen), torch.randn(Hkv, d, generator=gen)


def test_sink_with_its_own_dequantized_values_changes_nothing():
    """Masking a token's codes out and handing its (dequantized) key and value in as the exact sink gives the
    same attention: sink_inputs' score (scale, log2 units, no q . k_mean) matches the kernels' convention."""
    B, Hq, Hkv, d, T = 2, 8, 2, 64, 24
    kl, vl, args, kp, vp, q, mean = _fast_case(3, B, Hq, Hkv, d, T)
    lens = torch.tensor([T, 17], dtype=torch.int32)
    pos = torch.tensor([0, 5])
    k_store = _fast_dequant(kl, kp, args["k_factor"])  # [B, Hkv, T, d]
    v_store = _fast_dequant(vl, vp, args["v_factor"])
    at = torch.arange(B)
    k_model = torch.einsum("bhe,hed->bhd", k_store[at, :, pos], args["k_basis"]) + mean  # exact key of the sink
    score, pos32 = sink_inputs(q, k_model, mean, pos, None, scale := 0.3 / math.sqrt(d))
    assert pos32.dtype == torch.int32 and pos32.tolist() == [0, 5]
    plain = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, **args)
    sunk = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, sink_score=score,
                                              sink_value=v_store[at, :, pos], sink_pos=pos32, **args)
    assert rel_err(sunk, plain) < 1e-5
    other = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, sink_score=score,
                                               sink_value=v_store[at, :, pos], sink_pos=pos32 + 1, **args)
    assert rel_err(other, plain) > 1e-3  # skipping another token's codes is seen
    # a sink the attention mask hides (a padding token taken for one) has no say
    hide = torch.ones(B, T, dtype=torch.bool)
    hide[1, :6] = False
    score2, _ = sink_inputs(q, k_model, mean, pos, hide, scale)
    assert torch.isinf(score2[1]).all() and torch.isfinite(score2[0]).all()
    masked = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, kv_mask=hide, **args)
    sunk2 = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=scale, kv_mask=hide, sink_score=score2,
                                               sink_value=v_store[at, :, pos], sink_pos=pos32, **args)
    assert rel_err(sunk2[1], masked[1]) < 1e-5


def _sink(B, Hq, Hkv, d, gen, slots=False):
    score = torch.randn(B, Hq, generator=gen) * 2 + 8  # log2 units: a sink that draws real weight
    score[-1, :2] = float("-inf")  # rows (query heads) without a sink
    pos = torch.tensor([3] + [-1] * (B - 1), dtype=torch.int32)  # a packed copy to skip; a row without one
    if slots:  # the sink and outlier tokens: several packed copies per row to skip
        pos = torch.tensor([[3, 20, -1, 5], [-1, 7, 0, -1]], dtype=torch.int32)[:B]
    return dict(sink_score=score, sink_value=torch.randn(B, Hkv, d, generator=gen), sink_pos=pos)


@pytest.mark.interpreter
@pytest.mark.parametrize("G,slots", [(1, False), (4, False), (4, True)])
def test_fast_triton_sink_matches_reference(G, slots):
    gen = torch.Generator().manual_seed(10 + G)
    B, Hkv, d, T = 2, 2, 64, 40
    Hq = G * Hkv
    kl, vl = layout_for_budget(2.69, d)
    args = make_args(kl, vl, Hkv, gen)
    kp, vp = random_cache(kl, B, Hkv, T, gen), random_cache(vl, B, Hkv, T, gen)
    q = torch.randn(B, Hq, d, generator=gen)
    lens = torch.tensor([T, 9], dtype=torch.int32)
    sink = _sink(B, Hq, Hkv, d, gen, slots)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 0] = False
    ref = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=0.1, kv_mask=mask, **sink, **args)
    out = fa.decode_attention_fast_triton(q, kp, vp, lens, scale=0.1, num_splits=3, block_n=16, poison=True,
                                          kv_mask=mask, **sink, **args)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3, rel_err(out, ref)
    plain = fa.decode_attention_fast_reference(q, kp, vp, lens, scale=0.1, kv_mask=mask, **args)
    assert rel_err(plain, ref) > 1e-2  # the sink has a say


@pytest.mark.interpreter
@pytest.mark.parametrize("slots", [False, True])
def test_planes_triton_sink_matches_reference(slots):
    gen = torch.Generator().manual_seed(21)
    B, Hq, Hkv, d, T = 2, 8, 2, 64, 33
    kfmt, vfmt = make_format("turbo4", d, Hkv, gen), make_format("hybrid", d, Hkv, gen)
    args = attention_args(kfmt, vfmt, Hkv, d, gen)
    kp, vp = random_planes(kfmt, B, Hkv, T, gen), random_planes(vfmt, B, Hkv, T, gen)
    q = torch.randn(B, Hq, d, generator=gen)
    lens = torch.tensor([T, 1], dtype=torch.int32)
    sink = _sink(B, Hq, Hkv, d, gen, slots)
    ref = da.decode_attention_reference(q, kp, vp, lens, scale=0.125, **sink, **args)
    out = da.decode_attention_triton(q, kp, vp, lens, scale=0.125, num_splits=2, block_n=16, poison=True,
                                     **sink, **args)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3, rel_err(out, ref)


def test_sink_arguments_are_checked():
    gen = torch.Generator().manual_seed(2)
    kl, vl = layout_for_budget(2.69, 64)
    args = make_args(kl, vl, 1, gen)
    kp, vp = random_cache(kl, 1, 1, 8, gen), random_cache(vl, 1, 1, 8, gen)
    q, lens = torch.randn(1, 2, 64), torch.tensor([8], dtype=torch.int32)
    with pytest.raises(ValueError, match="all three or none"):
        fa.decode_attention_fast_reference(q, kp, vp, lens, scale=0.1, sink_score=torch.zeros(1, 2), **args)
    with pytest.raises(ValueError, match=r"sink_value \[1, 1, 64\]"):
        fa.decode_attention_fast_reference(q, kp, vp, lens, scale=0.1, sink_score=torch.zeros(1, 2),
                                           sink_value=torch.zeros(1, 3, 64), sink_pos=torch.zeros(1), **args)


# ------------------------------------------------------------------------------------------------
# the cache
# ------------------------------------------------------------------------------------------------

def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("pad_position", [0, 1])
def test_cache_keeps_the_first_real_token_exact(pad_position):
    """Left padding (generate() gives pads position 0 in transformers 5.2x, 1 before): the sink is the first real
    token; every read returns its exact key; reset forgets it."""
    from sqcompile.cache import SpectralCache

    model = _tiny()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, pad_position)
    cache = SpectralCache(model, bits=2.69, max_cache_len=16, outlier_tokens=0)
    seen = {}
    layer = cache.layers[1]
    update = layer.update

    def spy(key_states, value_states, *a, **kw):
        seen.setdefault("keys", []).append(key_states.detach().clone())
        out = update(key_states, value_states, *a, **kw)
        seen["out"] = out[0]
        return out

    layer.update = spy
    with torch.no_grad():  # the prompt, then one decode step that reads it from the cache
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        assert torch.allclose(seen["out"][:, :, :7], seen["keys"][0], atol=1e-6)  # a prompt attends to itself exactly
        model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
              position_ids=pos[:, -1:] + 1, past_key_values=cache, use_cache=True)
    assert layer.sink_pos.tolist() == [[0], [3]]
    key = seen["keys"][0]
    for b, p in ((0, 0), (1, 3)):
        assert torch.allclose(seen["out"][b, :, p], key[b, :, p], atol=1e-6)
        assert torch.allclose(layer.sink_k[b, :, 0], key[b, :, p].float())
    assert (seen["out"][1, :, 4] - key[1, :, 4]).abs().max() > 1e-3  # the other tokens are read quantized
    assert cache.sink_nbytes == 2 * (2 * 2 * 2 * 16 * 4 + 2 * 8 + 2 * 4)  # K, V, position, criterion
    cache.reset()
    assert layer.sink_pos.tolist() == [[-1], [-1]]
    off = SpectralCache(model, bits=2.69, max_cache_len=16, keep_sink=False, outlier_tokens=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=off, use_cache=True)
    assert off.sink_nbytes == 0 and not hasattr(off.layers[0], "sink_pos")


@pytest.mark.interpreter
@pytest.mark.parametrize("sink_at", [0, 9, None, "slots"])
def test_extra_split_of_sink_and_new_token_with_their_own_values_changes_nothing(sink_at):
    """A decode step's exact tokens (`extra_inputs`: the sink and the step's own new token, merged into one split
    with a value per query head) carrying their own dequantized K/V give the attention of the plain cache: the op
    reads up to the new token, skips the sink's codes, and counts a sink that is the new token once. The Triton
    kernel (interpreted, output poisoned) equals the reference with that split."""
    from sqcompile.kernels.sink import extra_inputs

    B, Hq, Hkv, d, T = 2, 8, 2, 64, 16
    kl, vl, args, kp, vp, q, mean = _fast_case(7, B, Hq, Hkv, d, T)
    new_at = 9
    k_store, v_store = _fast_dequant(kl, kp, args["k_factor"]), _fast_dequant(vl, vp, args["v_factor"])
    k_model = torch.einsum("bhte,hed->bhtd", k_store, args["k_basis"]) + mean[None, :, None, :]
    scale = 0.25 / math.sqrt(d)
    new = (k_model[:, :, new_at:new_at + 1], v_store[:, :, new_at:new_at + 1], torch.tensor([new_at]))
    if sink_at == "slots":  # the sink and outlier tokens, one slot the new token itself, one empty
        at = torch.tensor([[0, 4, 9, -1], [2, 9, 5, -1]])
        take = at.clamp(min=0)[:, None, :, None].expand(B, Hkv, 4, d)
        sink = (k_model.gather(2, take), v_store.gather(2, take), at)
    else:
        sink = None if sink_at is None else (k_model[:, :, sink_at], v_store[:, :, sink_at],
                                             torch.full((B,), sink_at, dtype=torch.long))
    score, value, pos = extra_inputs(q, mean, None, scale, sink=sink, new=new)
    assert value.shape == ((B, Hq, d) if sink is not None else (B, Hkv, d))
    plain = fa.decode_attention_fast_reference(q, kp, vp, torch.full((B,), new_at + 1, dtype=torch.int32),
                                               scale=scale, **args)
    upto = torch.full((B,), new_at, dtype=torch.int32)  # the new token's codes are not read
    ref = fa.decode_attention_fast_reference(q, kp, vp, upto, scale=scale, sink_score=score, sink_value=value,
                                             sink_pos=pos, **args)
    assert rel_err(ref, plain) < 1e-5
    out = fa.decode_attention_fast_triton(q, kp, vp, upto, scale=scale, num_splits=2, block_n=16, poison=True,
                                          sink_score=score, sink_value=value, sink_pos=pos, **args)
    assert rel_err(out, ref) < 2e-3


def test_cache_keeps_the_outlier_tokens_exact():
    """outlier_tokens: the keys farthest from the key mean (summed over kv-heads) stay exact beside the sink, the
    sink and left padding (position 1 before the first real token) not counted; a farther new key takes the slot
    of the nearest one held, which is read from its codes again; crop and reset forget them."""
    from sqcompile.cache import SpectralCache

    model = _tiny()
    cache = SpectralCache(model, bits=2.69, max_cache_len=16, outlier_tokens=1)
    layer = cache.layers[0]
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 6, 16, generator=gen) * 0.1
    v = torch.randn(2, 2, 6, 16, generator=gen)
    k[0, :, 4] *= 50  # row 0's outlier
    k[1, :, 5] *= 50  # row 1's outlier
    k[1, :, :2] *= 200  # row 1's padding: farther still, never taken
    pid = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 1, 0, 1, 2, 3]])
    with torch.no_grad():
        out, _ = layer.update(k, v, {"position_ids": pid})
        assert layer.sink_pos.tolist() == [[0, 4], [2, 5]]
        k2 = torch.randn(2, 2, 1, 16, generator=gen) * 0.1
        k2[0] *= 500  # farther than row 0's outlier: takes its slot
        out, _ = layer.update(k2, torch.randn(2, 2, 1, 16, generator=gen), {"position_ids": pid[:, -1:] + 1})
    assert layer.sink_pos.tolist() == [[0, 6], [2, 5]]
    assert torch.allclose(out[1, :, 5], k[1, :, 5], atol=1e-5) and torch.allclose(out[0, :, 0], k[0, :, 0], atol=1e-5)
    assert torch.allclose(layer.sink_k[0, :, 1], k2[0, :, 0])
    assert (out[0, :, 4] - k[0, :, 4]).abs().max() > 1e-2  # evicted: read from its codes
    layer.crop(-1)  # the last token (position 6) goes
    assert layer.sink_pos.tolist() == [[0, -1], [2, 5]]
    cache.reset()
    assert layer.sink_pos.tolist() == [[-1, -1], [-1, -1]]
    for bad in (-1, 8, 2.0, True):
        with pytest.raises(ValueError, match="outlier_tokens"):
            SpectralCache(model, bits=2.69, max_cache_len=16, outlier_tokens=bad)


def test_exact_split_and_store_exact_pass_opcheck():
    """The two ops the compiled graph holds (one node each for Inductor): schema, fake tensors and autograd
    registration agree with the eager kernels (`torch.library.opcheck`); exact_split's value comes per query head."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, S, d = 2, 4, 2, 3, 8
    q, mean = torch.randn(B, Hq, d, generator=gen), torch.randn(Hkv, d, generator=gen)
    sk, sv = torch.randn(B, Hkv, S, d, generator=gen), torch.randn(B, Hkv, S, d, generator=gen)
    pos = torch.tensor([[0, 5, -1], [2, 3, 7]])
    new = (torch.randn(B, Hkv, 1, d, generator=gen), torch.randn(B, Hkv, 1, d, generator=gen), torch.tensor([7]))
    for args in ((q, mean, None, 0.3, sk, sv, pos, *new), (q, mean, None, 0.3, sk[:, :, 0], sv[:, :, 0], pos[:, 0],
                                                            None, None, None), (q, mean, None, 0.3, None, None, None, *new)):
        torch.library.opcheck(torch.ops.sqcompile.exact_split.default, args)
        score, value, p = torch.ops.sqcompile.exact_split(*args)
        assert score.shape == (B, Hq) and value.shape == (B, Hq, d) and p.dtype == torch.int32 and p.shape[0] == B
    # the new token at position 7 is also row 1's slot: counted once, as extra_inputs does
    from sqcompile.kernels.sink import extra_inputs

    ref = extra_inputs(q, mean, None, 0.3, sink=(sk, sv, pos), new=new)
    got = torch.ops.sqcompile.exact_split(q, mean, None, 0.3, sk, sv, pos, *new)
    assert torch.allclose(got[0], ref[0]) and torch.allclose(got[1], ref[1])
    buffers = (torch.zeros(B, Hkv, S, d), torch.zeros(B, Hkv, S, d), torch.full((B, S), -1), torch.full((B, S), -math.inf))
    keys, v = torch.randn(B, Hkv, 5, d, generator=gen), torch.randn(B, Hkv, 5, d, generator=gen)
    torch.library.opcheck(torch.ops.sqcompile.store_exact.default,
                          (*buffers, keys, v, torch.arange(5), None, mean, True, S - 1))
    with pytest.raises(ValueError, match="needs the exact slots"):
        torch.ops.sqcompile.exact_split(q, mean, None, 0.3, None, None, None, None, None, None)


@pytest.mark.interpreter
@pytest.mark.parametrize("G,parts", [(1, "both"), (4, "both"), (4, "slots"), (4, "new"), (2, "three slots")])
def test_exact_split_triton_matches_torch(G, parts):
    """`sink_triton.exact_split_triton` (interpreted, outputs poisoned) equals `exact_split_torch`: empty slots,
    a masked slot, a slot holding the new token itself (counted once), a row with nothing exact."""
    from sqcompile.kernels.sink import exact_split_torch
    from sqcompile.kernels.sink_triton import exact_split_triton

    gen = torch.Generator().manual_seed(30 + G)
    B, Hkv, S, d, T = 3, 2, 4, 64, 12
    Hq = G * Hkv
    q, mean = torch.randn(B, Hq, d, generator=gen), torch.randn(Hkv, d, generator=gen)
    sk, sv = torch.randn(B, Hkv, S, d, generator=gen), torch.randn(B, Hkv, S, d, generator=gen)
    pos = torch.tensor([[0, 5, -1, 9], [2, 3, 7, -1], [-1, -1, -1, -1]])
    if parts == "three slots":  # a slot count that is no power of two (the kernel's slot block is masked)
        S, sk, sv, pos = 3, sk[:, :, :3], sv[:, :, :3], pos[:, :3]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3] = False
    new = (torch.randn(B, Hkv, 1, d, generator=gen), torch.randn(B, Hkv, 1, d, generator=gen), torch.tensor([7]))
    slots = (sk, sv, pos) if parts != "new" else (None,) * 3
    fresh = new if parts != "slots" else (None,) * 3
    args = (q, mean, mask, 0.3, *slots, *fresh)
    ref = exact_split_torch(*args)
    score, value = torch.full((B, Hq), float("nan")), torch.full((B, Hq, d), float("nan"))
    positions = torch.full((B, S if parts != "new" else 1), -7, dtype=torch.int32)
    got = exact_split_triton(*args, score=score, value=value, pos=positions)
    # the positions as int32 (written by the launch itself): the slots', or -1 without slots
    assert got[2].dtype == torch.int32 and torch.equal(got[2], pos.int() if parts != "new" else torch.full((B, 1), -1).int())
    assert torch.equal(torch.isinf(got[0]), torch.isinf(ref[0]))
    fin = torch.isfinite(ref[0])
    assert torch.allclose(got[0][fin], ref[0][fin], atol=1e-5) and torch.allclose(got[1], ref[1], atol=1e-5)


def _canonical(buffers, o):
    """Slot buffers with the outlier slots (from o) ordered by position: the torch form re-sorts them by their
    criterion, the step kernel writes in place."""
    k, v, p, c = buffers
    order = torch.cat([torch.arange(o).expand(p.shape[0], o), o + p[:, o:].argsort(1)], 1)
    take = order[:, None, :, None].expand_as(k)
    return k.gather(2, take), v.gather(2, take), p.gather(1, order), c.gather(1, order)


@pytest.mark.parametrize("keep_sink,outliers,pid,H", [(True, 3, "none", 2), (True, 3, "sink", 2), (False, 4, "given", 2),
                                                       (True, 0, "sink", 2), (True, 2, "none", 3)])
@pytest.mark.interpreter
def test_store_exact_step_triton_matches_torch(keep_sink, outliers, pid, H):
    """`sink_triton.store_exact_step_triton` (interpreted) leaves the slot buffers as `store_exact_torch` does
    after a prompt and three decode steps: the sink at RoPE position 0, a farther key taking the nearest held
    key's slot, a nearer one not."""
    from sqcompile.kernels.sink import store_exact_torch
    from sqcompile.kernels.sink_triton import store_exact_step_triton

    gen = torch.Generator().manual_seed(40 + outliers)
    B, d = 2, 64
    S = int(keep_sink) + outliers
    mean = torch.randn(H, d, generator=gen)
    bufs = [torch.zeros(B, H, S, d), torch.zeros(B, H, S, d), torch.full((B, S), -1), torch.full((B, S), float("-inf"))]
    k, v = torch.randn(B, H, 5, d, generator=gen), torch.randn(B, H, 5, d, generator=gen)
    store_exact_torch(*bufs, k, v, torch.arange(1, 6), None, mean, keep_sink, outliers)  # a prompt at 1..5
    mine = [t.clone() for t in bufs]
    for step, scale in enumerate((100.0, 0.01, 3.0)):
        key = mean[None, :, None, :] + scale * torch.randn(B, H, 1, d, generator=gen)
        val = torch.randn(B, H, 1, d, generator=gen)
        at = torch.tensor([6 + step]) if pid != "sink" or step else torch.tensor([0])
        ids = {"none": None, "sink": torch.zeros(1, 1, dtype=torch.long) + step, "given": torch.tensor([[0], [4]]) + step}[pid]
        store_exact_torch(*bufs, key, val, at, ids, mean, keep_sink, outliers)
        store_exact_step_triton(*mine, key, val, at, ids, mean, keep_sink, outliers)
    o = int(keep_sink)
    for a, b in zip(_canonical(mine, o), _canonical(bufs, o)):
        assert torch.allclose(a, b, atol=1e-5), (a, b)

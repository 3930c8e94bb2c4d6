"""Fused mixture-of-experts: routing, grouped gate/up GEMM with SiLU-and-multiply, grouped down GEMM.

Two custom ops with one contract (the Triton one is what the substitution pass puts in GPU graphs), and two for
the experts alone (`fused_experts`, `fused_experts_triton`: the same kernels after the model's own routing, given
topk_weights [T, k] and topk_ids [T, k], for routers the fused routing does not compute):

    torch.ops.sqcompile.fused_moe(hidden, router_logits, w_gate_up, w_down, top_k, renormalize, routing)
    torch.ops.sqcompile.fused_moe_triton(... same ...)

    hidden        [T, H]        tokens (any float dtype; the output has this dtype)
    router_logits [T, E]        router linear output; scores = softmax or sigmoid in fp32
    w_gate_up     [E, 2*I, H]   HF layout: rows 0..I-1 are the gate projection, I..2I-1 the up projection
    w_down        [E, H, I]     HF layout
    top_k         int           experts per token
    renormalize   bool          divide the top-k scores by their sum
    routing       str           "softmax" | "sigmoid"

    out[t] = sum_j w[t, j] * down_e( silu(gate_e(x_t)) * up_e(x_t) ),  e = topk_ids[t, j]

The weighted top-k sum is accumulated in fp32 and cast to hidden.dtype once at the end (as HF's
grouped_mm / batched_mm experts do).

Triton layout. Token-expert pairs p = t * top_k + j are sorted by expert and each expert's run is padded
to a multiple of BLOCK_M (`align_pairs_to_blocks`), so one program of the grouped GEMM owns BLOCK_M
rows of ONE expert: it reads that expert's weight tile once for all its rows. Padding rows hold the
sentinel S = T * top_k and are masked. Blocks past the last expert have expert -1 and exit at once.
With few tokens (decode), every used expert gets exactly one block per N-tile, so each used expert's
weights are read exactly once and unused experts' weights are never read.

Kernels, in launch order: `_route_kernel` (scores, top-k, renormalise; one program per token),
`_align_kernel` (the sort/pad in one program when the pairs are few; larger batches use the torch
`align_pairs_to_blocks`), `_gate_up_kernel` (grouped GEMM over all experts, SiLU(gate) * up in the
epilogue), `_down_kernel` (grouped GEMM, routing weight in the epilogue; split-K with atomic adds in
decode so that enough programs stream the few used experts), then the [T, k, H] -> [T, H] sum.
Both GEMMs run a 1-D grid in `_grouped_tile` order: GROUP_M blocks of rows at a time, so the programs resident
together share a few row blocks and a run of weight tiles (prefill: fewer L2 misses); decode keeps every block
in one group (row blocks vary fastest). Block sizes, stages and order: `_config`, tuned on an H100 and an H200 with
`benchmarks/moe_tune.py`. No Python loop over experts and no host sync anywhere.

Prefill on Hopper (`_config` fields TMA, H_SORTED, PERSISTENT, W_PAIR, H_STORE_TMA): weight tiles come by TMA from
descriptors made in the kernel over the contiguous weights (a tile that runs past an expert's rows reads the next rows
or zeros; those columns are masked at the store). The gate/up kernel loads an expert's gate tile and up tile as one
box of w viewed as [E * 2, I, H] and multiplies them by x in one dot of 2 * BLOCK_N columns (W_PAIR; the two halves
of the accumulator are split in registers); without W_PAIR, two boxes of w as [E * 2I, H] and two dots. h is stored
in block order (by TMA with H_STORE_TMA) so that the down kernel reads its tiles by TMA too; the gate/up kernel runs
one program per SM, each walking tiles in `_grouped_tile` order. The token rows of x are a gather (cp.async loads), or
with a wide FFN (X_SORTED) a copy of x in block order made first and read by TMA. Device-side descriptors need a
scratch allocator: `_set_tma_allocator`.

Prefill with `torch._grouped_mm` (`_config` field GROUPED_MM; CUDA sm_90+, bf16): "down" (the default there) keeps
the gate/up kernel above (h in block order) and runs the down GEMM as CUTLASS's grouped GEMM over the padded rows
(offs = each expert's padded run end; padding rows give output rows nobody reads), then `_topk_sum_kernel` gathers
each token's k rows, weights them and sums in fp32. "both" (kept for measurement) sorts the pairs without padding,
gathers x and runs both GEMMs by `torch._grouped_mm`, SiLU-and-multiply in `_silu_mul_kernel`. H100 under Inductor:
Mixtral T=4096 5355 -> 5183 us, Qwen-MoE T=4096 1438 -> 1261 us (benchmarks/moe_before_after.py).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import tuned_config

ROUTINGS = ("softmax", "sigmoid")


# ----------------------------------------------------------------------------------------------------
# Routing (shared by both paths)
# ----------------------------------------------------------------------------------------------------

def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, routing: str):
    """Top-k routing as HF computes it: scores in fp32, top-k, optional renormalisation.

    Returns (topk_weights fp32 [T, k], topk_ids int64 [T, k]).
    """
    if routing == "softmax":
        scores = torch.softmax(router_logits.float(), dim=-1)
    elif routing == "sigmoid":
        scores = torch.sigmoid(router_logits.float())
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _check(hidden, router_logits, w_gate_up, w_down, top_k, routing):
    torch._check(hidden.dim() == 2, lambda: f"hidden must be [T, H], got {tuple(hidden.shape)}")
    torch._check(router_logits.dim() == 2, lambda: "router_logits must be [T, E]")
    torch._check(w_gate_up.dim() == 3 and w_down.dim() == 3, lambda: "expert weights must be 3-D")
    E, two_i, H = w_gate_up.shape
    torch._check(two_i % 2 == 0, lambda: "w_gate_up must be [E, 2*I, H]")
    torch._check(hidden.shape[1] == H, lambda: "hidden size mismatch")
    torch._check(router_logits.shape[1] == E, lambda: "router_logits must have E columns")
    torch._check(tuple(w_down.shape) == (E, H, two_i // 2), lambda: "w_down must be [E, H, I]")
    torch._check(1 <= top_k <= E, lambda: "top_k out of range")
    torch._check(routing in ROUTINGS, lambda: f"routing must be one of {ROUTINGS}")


# ----------------------------------------------------------------------------------------------------
# Torch reference (kernels="torch"; any device)
# ----------------------------------------------------------------------------------------------------

def fused_moe_reference(hidden, router_logits, w_gate_up, w_down, top_k: int, renormalize: bool,
                        routing: str = "softmax") -> torch.Tensor:
    """Plain-PyTorch fused MoE: sort pairs by expert, one matmul pair per used expert."""
    weights, ids = route(router_logits, top_k, renormalize, routing)
    return experts_reference(hidden, weights, ids, w_gate_up, w_down)


def experts_reference(hidden, topk_weights, topk_ids, w_gate_up, w_down) -> torch.Tensor:
    """The experts half of `fused_moe_reference`: routing already done (weights [T, k], expert ids [T, k])."""
    T, H = hidden.shape
    E = w_gate_up.shape[0]
    inter = w_gate_up.shape[1] // 2
    top_k = topk_ids.shape[1]
    weights, ids = topk_weights.float(), topk_ids.long()
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=E).tolist()  # one host sync, as HF's fallback does
    x = hidden[order // top_k].to(w_gate_up.dtype)
    pair_out = torch.empty(T * top_k, H, dtype=torch.float32, device=hidden.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gate_up = x[rows] @ w_gate_up[e].t()
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        pair_out[order[rows]] = (h @ w_down[e].t()).float()
        start += n
    out = (pair_out * weights.reshape(-1, 1)).view(T, top_k, H).sum(dim=1)
    return out.to(hidden.dtype)


@torch.library.custom_op("sqcompile::fused_moe", mutates_args=())
def fused_moe(hidden: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, top_k: int, renormalize: bool, routing: str = "softmax") -> torch.Tensor:
    """Fused MoE, torch reference implementation (see the module docstring for the contract)."""
    _check(hidden, router_logits, w_gate_up, w_down, top_k, routing)
    return fused_moe_reference(hidden, router_logits, w_gate_up, w_down, top_k, renormalize, routing)


@fused_moe.register_fake
def _(hidden, router_logits, w_gate_up, w_down, top_k, renormalize, routing="softmax"):
    _check(hidden, router_logits, w_gate_up, w_down, top_k, routing)
    return hidden.new_empty(hidden.shape)


def _check_experts(hidden, topk_weights, topk_ids, w_gate_up, w_down):
    torch._check(topk_weights.dim() == 2 and topk_ids.shape == topk_weights.shape,
                 lambda: "topk_weights and topk_ids must both be [T, k]")
    torch._check(topk_ids.shape[0] == hidden.shape[0], lambda: "topk_ids must have one row per token")
    _check(hidden, hidden.new_empty(hidden.shape[0], w_gate_up.shape[0]), w_gate_up, w_down, topk_ids.shape[1],
           "softmax")


@torch.library.custom_op("sqcompile::fused_experts", mutates_args=())
def fused_experts(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
                  w_down: torch.Tensor) -> torch.Tensor:
    """The experts of a fused MoE with the routing done by the model (any router: bias-corrected, group-limited,
    scaled): out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, j]."""
    _check_experts(hidden, topk_weights, topk_ids, w_gate_up, w_down)
    return experts_reference(hidden, topk_weights, topk_ids, w_gate_up, w_down)


@fused_experts.register_fake
def _(hidden, topk_weights, topk_ids, w_gate_up, w_down):
    _check_experts(hidden, topk_weights, topk_ids, w_gate_up, w_down)
    return hidden.new_empty(hidden.shape)


# ----------------------------------------------------------------------------------------------------
# Triton implementation
# ----------------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def align_pairs_to_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int, return_ends: bool = False):
    """Sort token-expert pairs by expert, padding each expert's run to a multiple of block_m.

    Returns (sorted_pair_ids int32 [P], block_expert int32 [P // block_m]) with the static bound
    P = round_up(S + E * (block_m - 1), block_m), S = T * top_k. Padding holds the sentinel S;
    blocks past the used range have expert -1. Only fixed-size torch ops, so no host sync and no
    data-dependent shapes (safe under CUDA graphs and Inductor). return_ends: also each expert's padded
    run end (int32 [E], cumulative: `torch._grouped_mm`'s offs over the padded rows).
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    S = flat.numel()
    P = triton.cdiv(S + num_experts * (block_m - 1), block_m) * block_m if HAS_TRITON else 0
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(_sort_keys(flat, num_experts), stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(S, device=device) - start[sorted_experts]
    dest = padded_start[sorted_experts] + rank
    sorted_pair_ids = torch.full((P,), S, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    block_first_row = torch.arange(0, P, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_first_row, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    if return_ends:
        return sorted_pair_ids, block_expert, padded_end.to(torch.int32)
    return sorted_pair_ids, block_expert


def _sort_keys(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids in the narrowest dtype that holds them: a radix sort of uint8 keys makes one pass, not eight
    (H100, Mixtral T=4096: the sort of 8192 int64 keys took 48 us)."""
    return expert_ids.to(torch.uint8 if num_experts <= 256 else torch.int32)


def sort_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """Pairs sorted by expert without padding (the `torch._grouped_mm` layout).

    Returns (order int64 [S]: sorted row r holds pair order[r]; offs int32 [E]: each expert's cumulative row end;
    row int32 [S]: the sorted row of pair p). Fixed-size torch ops only (no host sync).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(_sort_keys(flat, num_experts), stable=True)
    sorted_experts = flat[order]
    experts = torch.arange(num_experts, device=flat.device, dtype=torch.int64)
    offs = torch.searchsorted(sorted_experts, experts, right=True).to(torch.int32)
    row = torch.empty_like(flat, dtype=torch.int32).scatter_(
        0, order, torch.arange(flat.numel(), device=flat.device, dtype=torch.int32))
    return order, offs, row


if HAS_TRITON:

    @triton.jit
    def _route_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_t,
                      TOP_K: tl.constexpr, BLOCK_TOPK: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr,
                      RENORMALIZE: tl.constexpr):
        """One program per token: scores, top-k by repeated argmax, optional renormalisation."""
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK_E)
        mask = offs < E
        logits = tl.load(logits_ptr + t * stride_t + offs, mask=mask, other=-float("inf")).to(tl.float32)
        if SIGMOID:
            scores = 1.0 / (1.0 + tl.exp(-logits))
        else:
            scores = tl.exp(logits - tl.max(logits, axis=0))
            scores = scores / tl.sum(scores, axis=0)
        scores = tl.where(mask, scores, -1.0)  # below any sigmoid/softmax score
        offs_k = tl.arange(0, BLOCK_TOPK)
        top_weights = tl.zeros((BLOCK_TOPK,), dtype=tl.float32)
        top_ids = tl.zeros((BLOCK_TOPK,), dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(scores, axis=0)
            # lowest index among equal maxima
            idx = tl.min(tl.where(scores == best, offs, BLOCK_E), axis=0)
            top_weights = tl.where(offs_k == j, best, top_weights)
            top_ids = tl.where(offs_k == j, idx, top_ids)
            scores = tl.where(offs == idx, -2.0, scores)
        if RENORMALIZE:
            top_weights = top_weights / tl.sum(top_weights, axis=0)
        k_ok = offs_k < TOP_K
        tl.store(weights_ptr + t * TOP_K + offs_k, top_weights, mask=k_ok)
        tl.store(ids_ptr + t * TOP_K + offs_k, top_ids, mask=k_ok)

    @triton.jit
    def _align_kernel(ids_ptr, sorted_pair_ids_ptr, block_expert_ptr, S, E, P,
                      BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
        """`align_pairs_to_blocks` in ONE program, for few pairs (decode): no host sync, one launch.

        Same output as the torch version: pairs of one expert in ascending pair order.
        """
        s = tl.arange(0, BLOCK_S)
        e = tl.arange(0, BLOCK_E)
        ids = tl.load(ids_ptr + s, mask=s < S, other=BLOCK_E)            # padding matches no expert
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)                 # [S, E]
        counts = tl.sum(onehot, axis=0)                                    # [E]
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        padded_end = tl.cumsum(padded, axis=0)
        padded_start = padded_end - padded
        # rank of pair s among the earlier pairs of its expert
        same = (ids[:, None] == ids[None, :]) & (s[None, :] < s[:, None])  # [S, S']
        rank = tl.sum(same.to(tl.int32), axis=1)
        dest = tl.sum(onehot * padded_start[None, :], axis=1) + rank
        p = tl.arange(0, BLOCK_P)
        tl.store(sorted_pair_ids_ptr + p, tl.full((BLOCK_P,), 0, tl.int32) + S, mask=p < P)
        tl.debug_barrier()  # the sentinel fill lands before the scatter below
        tl.store(sorted_pair_ids_ptr + dest, s, mask=s < S)
        b = tl.arange(0, BLOCK_B)
        first_row = b * BLOCK_M
        expert = tl.sum(((padded_end[None, :] <= first_row[:, None]) & (e[None, :] < E)).to(tl.int32), axis=1)
        expert = tl.where(expert < E, expert, -1)
        tl.store(block_expert_ptr + b, expert, mask=first_row < P)

    @triton.jit
    def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) for a 1-D program id, GROUP_M row blocks at a time (the L2-friendly order of
        Triton's matmul tutorial): the programs resident together share GROUP_M blocks of rows and a run of
        weight tiles instead of every block of rows and one or two weight tiles."""
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % size_m
        pid_n = (pid % in_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def _gate_up_tile(tile, x_ptr, x_desc, w_ptr, w_desc, h_ptr, h_desc, sorted_pair_ids_ptr, block_expert_ptr,
                      S, H, INTER, NUM_BLOCKS, stride_xt, stride_we, stride_wn, stride_hs,
                      TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, H_SORTED: tl.constexpr,
                      PRECISION: tl.constexpr, W_TMA: tl.constexpr, X_TMA: tl.constexpr, H_TMA: tl.constexpr):
        """One output tile of `_gate_up_kernel`: BLOCK_M pairs of one expert x BLOCK_N gate/up columns."""
        pid_m, pid_n = _grouped_tile(tile, NUM_BLOCKS, tl.cdiv(INTER, BLOCK_N), GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ids_ptr + offs_m)
        row_ok = pair < S
        token = pair // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < INTER
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + token[:, None] * stride_xt
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        gate_rows = w_base + offs_n[None, :] * stride_wn          # [1, BN] -> transposed tile [BK, BN]
        up_rows = w_base + (offs_n[None, :] + INTER) * stride_wn
        # W_TMA: row of w viewed as [E * 2I, H]; a tile past I reads the next rows (masked at the store)
        gate_row = expert * 2 * INTER + pid_n * BLOCK_N
        if W_TMA == 2:  # gate and up columns in one [BLOCK_M, 2 * BLOCK_N] accumulator: one dot per step
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        else:
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < H
            if X_TMA:  # x already in block order: rows pid_m * BLOCK_M.. (padding rows zero)
                x = x_desc.load([pid_m * BLOCK_M, k0])
            else:
                x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if W_TMA == 2:  # w viewed as [E * 2, I, H]: box [2, BLOCK_N, BLOCK_K] = the gate tile, then the up tile
                w = w_desc.load([2 * expert, pid_n * BLOCK_N, k0]).reshape(2 * BLOCK_N, BLOCK_K).T
                acc = tl.dot(x.to(w.dtype), w, acc, input_precision=PRECISION)
            else:
                if W_TMA:
                    wg = w_desc.load([gate_row, k0]).T
                    wu = w_desc.load([gate_row + INTER, k0]).T
                else:
                    wg = tl.load(gate_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    wu = tl.load(up_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                x = x.to(wg.dtype)
                acc_gate = tl.dot(x, wg, acc_gate, input_precision=PRECISION)
                acc_up = tl.dot(x, wu, acc_up, input_precision=PRECISION)
        if W_TMA == 2:
            acc_gate, acc_up = acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        if H_TMA:  # block order by TMA: padding rows stored too (nobody reads them), columns past I clipped
            h_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], h.to(h_ptr.dtype.element_ty))
        else:
            h_row = offs_m if H_SORTED else pair  # H_SORTED: h in block order (contiguous rows for the down kernel)
            tl.store(h_ptr + h_row[:, None] * stride_hs + offs_n[None, :],
                     h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_pair_ids_ptr, block_expert_ptr,
                        S, H, INTER, NUM_BLOCKS, W_ROWS, stride_xt, stride_we, stride_wn, stride_hs,
                        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, H_SORTED: tl.constexpr,
                        PRECISION: tl.constexpr, W_TMA: tl.constexpr, X_TMA: tl.constexpr,
                        H_TMA: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
        """h[p, n] = silu(x[t] . Wg[e, n]) * (x[t] . Wu[e, n]) for the BLOCK_M pairs p of one block.

        Grid (num_blocks * cdiv(I, BLOCK_N),), ordered by `_grouped_tile`, or (NUM_PROGRAMS,) persistent programs
        that walk the same tiles in the same order. Gate rows are w[e, n], up rows w[e, I + n]; both tiles share
        the x tile, and the SiLU-and-multiply runs on the fp32 accumulators. W_TMA 1: the two weight tiles by TMA from
        a descriptor over w as [E * 2I, H] (W_ROWS = E * 2I; w contiguous), two dots of BLOCK_N columns. W_TMA 2:
        one TMA box [2, BLOCK_N, BLOCK_K] over w as [E * 2, I, H] holds both tiles, and one dot of 2 * BLOCK_N
        columns (Hopper: m64n256 wgmma instead of two m64n128, the x tile read from shared memory once, not twice)
        fills one accumulator whose two halves are split in registers for the epilogue. X_TMA: x is already gathered into block
        order ([NUM_BLOCKS * BLOCK_M, H], row r = the token of sorted pair r) and its tiles come by TMA too.
        """
        if X_TMA:
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[NUM_BLOCKS * BLOCK_M, H], strides=[stride_xt, 1],
                                               block_shape=[BLOCK_M, BLOCK_K])
        else:
            x_desc = x_ptr
        if H_TMA:  # H_SORTED too: h [NUM_BLOCKS * BLOCK_M, I] in block order
            h_desc = tl.make_tensor_descriptor(h_ptr, shape=[NUM_BLOCKS * BLOCK_M, INTER], strides=[stride_hs, 1],
                                               block_shape=[BLOCK_M, BLOCK_N])
        else:
            h_desc = h_ptr
        if W_TMA == 2:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[W_ROWS // INTER, INTER, H],
                                               strides=[INTER * stride_wn, stride_wn, 1],
                                               block_shape=[2, BLOCK_N, BLOCK_K])
        elif W_TMA:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[W_ROWS, H], strides=[stride_wn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            w_desc = w_ptr
        if NUM_PROGRAMS == 0:
            _gate_up_tile(tl.program_id(0), x_ptr, x_desc, w_ptr, w_desc, h_ptr, h_desc, sorted_pair_ids_ptr,
                          block_expert_ptr, S, H, INTER, NUM_BLOCKS, stride_xt, stride_we, stride_wn, stride_hs,
                          TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, H_SORTED, PRECISION, W_TMA, X_TMA, H_TMA)
        else:
            for tile in range(tl.program_id(0), NUM_BLOCKS * tl.cdiv(INTER, BLOCK_N), NUM_PROGRAMS):
                _gate_up_tile(tile, x_ptr, x_desc, w_ptr, w_desc, h_ptr, h_desc, sorted_pair_ids_ptr,
                              block_expert_ptr, S, H, INTER, NUM_BLOCKS, stride_xt, stride_we, stride_wn, stride_hs,
                              TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, H_SORTED, PRECISION, W_TMA, X_TMA, H_TMA)

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, out_ptr, topk_weights_ptr, sorted_pair_ids_ptr, block_expert_ptr,
                     S, H, INTER, NUM_BLOCKS, H_ROWS, W_ROWS, stride_hs, stride_we, stride_wn, stride_os, K_PER_SPLIT,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, H_SORTED: tl.constexpr,
                     PRECISION: tl.constexpr, W_TMA: tl.constexpr, H_TMA: tl.constexpr):
        """out[p, n] = w[p] * (h[p] . Wd[e, n]) in fp32, for the BLOCK_M pairs p of one block.

        Grid (num_blocks * cdiv(H, BLOCK_N), SPLIT_K), ordered by `_grouped_tile`. With SPLIT_K > 1
        (decode: few blocks, long K) each program sums K_PER_SPLIT of the I inputs and adds its share
        atomically into a zeroed output. The top-k sum over j is a [T, k, H] reduction after it.
        W_TMA (SPLIT_K 1): weight tiles by TMA over w as [E * H, I] (W_ROWS = E * H); H_TMA (also H_SORTED):
        h tiles by TMA over h [H_ROWS, I].
        """
        pid_m, pid_n = _grouped_tile(tl.program_id(0), NUM_BLOCKS, tl.cdiv(H, BLOCK_N), GROUP_M)
        pid_k = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ids_ptr + offs_m)
        row_ok = pair < S
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        h_rows = h_ptr + (offs_m if H_SORTED else pair)[:, None] * stride_hs
        w_rows = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
        if W_TMA:  # a tile past H reads the next expert's rows (or zeros past the end): masked at the store
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[W_ROWS, INTER], strides=[stride_wn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        if H_TMA:  # a block's padding rows hold garbage: it only reaches output rows that are not stored
            h_desc = tl.make_tensor_descriptor(h_ptr, shape=[H_ROWS, INTER], strides=[stride_hs, 1],
                                               block_shape=[BLOCK_M, BLOCK_K])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, INTER)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < k_end
            if H_TMA:
                h = h_desc.load([pid_m * BLOCK_M, k0])
            else:
                h = tl.load(h_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if W_TMA:
                w = w_desc.load([expert * H + pid_n * BLOCK_N, k0]).T
            else:
                w = tl.load(w_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(h.to(w.dtype), w, acc, input_precision=PRECISION)
        weight = tl.load(topk_weights_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * weight[:, None]
        out = out_ptr + pair[:, None] * stride_os + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=row_ok[:, None] & n_ok[None, :])
        else:
            tl.atomic_add(out, acc, mask=row_ok[:, None] & n_ok[None, :])


    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, h_ptr, INTER, stride_g, stride_h, BLOCK_N: tl.constexpr):
        """h[r, n] = silu(gate_up[r, n]) * gate_up[r, I + n] in fp32 (the grouped_mm tier's gate/up epilogue)."""
        r = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < INTER
        gate = tl.load(gate_up_ptr + r * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + r * stride_g + INTER + offs, mask=ok, other=0.0).to(tl.float32)
        h = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(h_ptr + r * stride_h + offs, h.to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _topk_sum_kernel(y_ptr, row_ptr, topk_weights_ptr, out_ptr, H, stride_y, stride_o,
                         TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[t, n] = sum_j w[t, j] * y[row[t * k + j], n] in fp32, cast once (y: down outputs in sorted rows)."""
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < H
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            row = tl.load(row_ptr + t * TOP_K + j).to(tl.int64)
            weight = tl.load(topk_weights_ptr + t * TOP_K + j)
            acc += weight * tl.load(y_ptr + row * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# Allocator for the kernel's buffers; tests swap in a NaN-filling one to prove every element is written.
_empty = torch.empty


def _config(num_pairs, num_experts: int, hidden: int, inter: int, smem_bytes: int = 0,
            grouped_mm: bool = False, sm_count: int = 0, device_name: Optional[str] = None) -> dict:
    """Block sizes, warps, stages and program order (GROUP_M) of the two grouped GEMMs: the tuned configs of
    `sqcompile/kernels/configs/fused_moe.json` for `device_name` (`tuned_config`), by rows per expert.

    Decode (<= 16 pairs per expert): one 16-row block per used expert, narrow gate/up tiles and a split-K
    down projection so that ~programs_per_sm programs per SM (`sm_count`, 0 = that of the GPU the file was tuned
    on) stream the used experts' weights. Larger counts: the tiles `benchmarks/moe_tune.py` picked on an H100 and
    an H200 (BENCHMARKS.md), which need about 192 KB of shared memory per program; `smem_bytes` (the device's
    opt-in limit, 0 = unknown) below that takes 3 or 2 stages.
    Many rows per expert also take TMA loads (TMA, DOWN_TMA; used only on sm_90+ with 16-byte aligned rows), the
    gate and up tiles in one box and one dot (W_PAIR, with TMA), h stored by TMA (H_STORE_TMA, with H_SORTED),
    h in block order (H_SORTED), x gathered into block order so that its tiles come by TMA
    too (X_SORTED; wide FFNs only) and persistent gate/up programs (PERSISTENT: programs per SM, 0 = one per tile).
    GROUPED_MM ("down": our gate/up kernel, then `torch._grouped_mm` for the down GEMM; "both": both GEMMs by
    `torch._grouped_mm`) where `grouped_mm` says the device has its CUTLASS kernels (`_grouped_mm_ok`).
    `_config_override` (tests, the tuner) replaces the choice."""
    if _config_override is not None:
        return dict(_config_override)
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, DOWN_BLOCK_N=32, DOWN_BLOCK_K=32, SPLIT_K=1,
                    num_warps=4, num_stages=2)
    tuned = tuned_config("fused_moe", device_name)
    rows_per_expert = num_pairs / num_experts
    decode = tuned["decode"]
    if rows_per_expert <= decode["max_rows_per_expert"]:
        used = min(num_pairs, num_experts) if isinstance(num_pairs, int) else num_experts
        tiles = used * triton.cdiv(hidden, 64)
        programs = decode["programs_per_sm"] * (sm_count or tuned["tuned_sm_count"])
        split_k = max(1, min(decode["split_k_max"], programs // max(tiles, 1), inter // 512))
        return dict(decode["config"], SPLIT_K=split_k, GROUP_M=NO_GROUPING)
    # 48 KB of operand tiles per stage at the prefill tiles (24 KB at the middle ones)
    stages = 4 if smem_bytes == 0 or smem_bytes >= 200 * 1024 else (3 if smem_bytes >= 150 * 1024 else 2)
    tier = tuned["middle"] if rows_per_expert <= tuned["middle"]["max_rows_per_expert"] else tuned["prefill"]
    cfg = {k: (stages if v == "smem" else v) for k, v in tier["config"].items()}
    if tier is tuned["middle"]:
        return cfg
    # Prefill: weight tiles (and h, stored in block order) by TMA where the device has it; persistent gate/up
    # programs. H100, Mixtral T=4096 under Inductor: gate/up 3236 -> 3065 us, down 1681 -> 1484 us, op 5731 -> 5337
    # us (candidates: benchmarks/results/moe_tma_candidates_h100_*.json).
    # x by TMA from a block-ordered copy: the gate/up kernel gains more than the copy costs only with a wide FFN
    # (H100 under Inductor, kernel times: Mixtral T=4096 gate/up 2995 -> 2814 us for a 45 us copy; Qwen-MoE, I = 1408:
    # 661 -> 645 us for a 78 us copy). The power-capped timed loop does not resolve the Mixtral gain (-1% to +3.5%
    # in three runs).
    cfg["X_SORTED"] = inter >= tier["x_sorted_min_inter"]
    # W_PAIR (gate and up tiles in one TMA box and one dot) and H_STORE_TMA (h stored by TMA): H100 under Inductor,
    # Mixtral T=4096: gate/up kernel 2750 -> 2695 us, the op at the power cap 5031 -> 4927 us and 3480 -> 3411 mJ
    # per call (HF + Inductor 5157 us, 3575-3726 mJ); Qwen-MoE 1332 -> 1288 us (BENCHMARKS.md, "Fused MoE").
    # CUTLASS's down GEMM beats ours; its gate/up plus a SiLU-and-multiply pass ties with our fused one at Mixtral
    # T=4096 and loses at fewer rows ("both" at T=1024: Mixtral 1723 us, Qwen-MoE 723 us, against "down" 1641 / 650)
    if grouped_mm:
        cfg["GROUPED_MM"] = "down"
    return cfg


def device_config(num_pairs, num_experts: int, hidden: int, inter: int, device: torch.device,
                  dtype: torch.dtype) -> dict:
    """`_config` as the op picks it on `device`: that device's shared memory, and the grouped_mm tier where it has
    `torch._grouped_mm`'s CUTLASS kernels for `dtype` and the rows are 16-byte aligned (the benchmarks start from it)."""
    on_gpu = device.type == "cuda"
    return _config(num_pairs, num_experts, hidden, inter, _smem_bytes(_device_index(device)) if on_gpu else 0,
                   _grouped_mm_ok(device, dtype) and (hidden * 2) % 16 == 0 and (inter * 2) % 16 == 0,
                   _sm_count(_device_index(device)) if on_gpu else 0,
                   torch.cuda.get_device_name(_device_index(device)) if on_gpu else None)


def _grouped_mm_fn():
    return getattr(torch, "_grouped_mm", None) or getattr(F, "grouped_mm", None)


def _grouped_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """`torch._grouped_mm`'s CUTLASS kernels: CUDA sm_90+, bf16 (its only dtype under Inductor)."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and _grouped_mm_fn() is not None
            and torch.cuda.get_device_capability(_device_index(device)) >= (9, 0))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


@functools.lru_cache(maxsize=None)
def _smem_bytes(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 0)


def _num_programs(per_sm: int, device: torch.device) -> int:
    """Persistent grid size: per_sm programs per SM (0: one program per tile). 4 SMs under the interpreter."""
    if not per_sm:
        return 0
    if device.type != "cuda":
        return 4 * per_sm
    return per_sm * torch.cuda.get_device_properties(_device_index(device)).multi_processor_count


def _has_tma(device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # the interpreter runs descriptor loads
    return torch.cuda.get_device_capability(_device_index(device)) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _set_tma_allocator() -> None:
    """Device-side TMA descriptors (`tl.make_tensor_descriptor`) need a global scratch; eager launches take it from
    torch's allocator (Inductor allocates its own). Triton's allocator is process-wide: set once, on first use."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                                     device=torch.cuda.current_device()))


_config_override = None
NO_GROUPING = 1 << 16  # GROUP_M that keeps every block of rows in one group: row blocks vary fastest


def _use_align_kernel(num_pairs, num_experts: int, block_m: int) -> bool:
    """The one-program align kernel for few pairs (its [S, S] and [S, E] tiles stay small)."""
    if not isinstance(num_pairs, int):  # symbolic token count: the torch version has no size limit
        return False
    s_pad = triton.next_power_of_2(num_pairs)
    p_pad = triton.next_power_of_2(num_pairs + num_experts * (block_m - 1))
    return s_pad * max(s_pad, triton.next_power_of_2(num_experts)) <= 16384 and p_pad <= 16384


def _fused_moe_triton_impl(hidden, router_logits, w_gate_up, w_down, top_k, renormalize, routing, launch):
    T = hidden.shape[0]
    E = w_gate_up.shape[0]
    device = hidden.device
    logits = router_logits.contiguous()
    topk_weights = _empty(T, top_k, dtype=torch.float32, device=device)
    topk_ids = _empty(T, top_k, dtype=torch.int32, device=device)
    launch(_route_kernel)[(T,)](
        logits, topk_weights, topk_ids, E, logits.stride(0),
        TOP_K=top_k, BLOCK_TOPK=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(E), SIGMOID=routing == "sigmoid",
        RENORMALIZE=renormalize)
    return _fused_experts_triton_impl(hidden, topk_weights, topk_ids, w_gate_up, w_down, launch)


def _fused_experts_triton_impl(hidden, topk_weights, topk_ids, w_gate_up, w_down, launch):
    """The expert GEMMs of the Triton fused MoE on routed pairs (topk_weights fp32 [T, k], topk_ids int32 [T, k])."""
    T, H = hidden.shape
    E, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    S = T * top_k
    device = hidden.device
    cfg = device_config(S, E, H, inter, device, w_gate_up.dtype)
    bm, bn, bk, warps, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"]
    down_bn, down_bk, split_k = cfg["DOWN_BLOCK_N"], cfg["DOWN_BLOCK_K"], cfg["SPLIT_K"]
    down_warps, down_stages = cfg.get("DOWN_WARPS", warps), cfg.get("DOWN_STAGES", stages)
    # each split covers a whole number of DOWN_BLOCK_K steps
    k_per_split = triton.cdiv(triton.cdiv(inter, split_k), down_bk) * down_bk
    precision = "ieee" if w_gate_up.dtype == torch.float32 else "tf32"

    grouped = cfg.get("GROUPED_MM", "")
    if grouped == "both":
        return _grouped_mm_moe(hidden, topk_weights, topk_ids, w_gate_up, w_down, launch)
    if grouped:
        assert grouped == "down" and cfg.get("H_SORTED"), f"GROUPED_MM {grouped!r} needs H_SORTED"
        sorted_pair_ids, block_expert, padded_ends = align_pairs_to_blocks(topk_ids, E, bm, return_ends=True)
    elif _use_align_kernel(S, E, bm):
        P = triton.cdiv(S + E * (bm - 1), bm) * bm
        sorted_pair_ids = _empty(P, dtype=torch.int32, device=device)
        block_expert = _empty(P // bm, dtype=torch.int32, device=device)
        launch(_align_kernel)[(1,)](
            topk_ids, sorted_pair_ids, block_expert, S, E, P,
            BLOCK_S=triton.next_power_of_2(S), BLOCK_E=triton.next_power_of_2(E),
            BLOCK_P=triton.next_power_of_2(P), BLOCK_B=triton.next_power_of_2(P // bm), BLOCK_M=bm)
    else:
        sorted_pair_ids, block_expert = align_pairs_to_blocks(topk_ids, E, bm)
    num_blocks = block_expert.shape[0]

    x = hidden.contiguous()
    w1 = w_gate_up.contiguous()
    w2 = w_down.contiguous()
    h_sorted = bool(cfg.get("H_SORTED", False))
    h = _empty(num_blocks * bm if h_sorted else S, inter, dtype=w1.dtype, device=device)
    group_m = cfg.get("GROUP_M", 8)
    # TMA: Hopper or newer (or the interpreter), 16-byte aligned rows (bf16: H and I multiples of 8)
    tma_ok = (_has_tma(device) and (H * w1.element_size()) % 16 == 0 and (inter * w1.element_size()) % 16 == 0)
    gate_up_tma = bool(cfg.get("TMA", False)) and tma_ok
    down_tma = bool(cfg.get("DOWN_TMA", cfg.get("TMA", False))) and tma_ok and split_k == 1
    if (gate_up_tma or down_tma) and device.type == "cuda":
        _set_tma_allocator()
    x_tma = gate_up_tma and bool(cfg.get("X_SORTED", False))
    if x_tma:  # x gathered into block order, padding rows zero (as the kernel's masked gather gives them)
        x_rows = x.index_select(0, torch.clamp(sorted_pair_ids // top_k, max=T - 1))
        x = torch.where((sorted_pair_ids < S)[:, None], x_rows, 0.0).to(w1.dtype)
    gate_up_tiles = num_blocks * triton.cdiv(inter, bn)
    programs = min(gate_up_tiles, _num_programs(cfg.get("PERSISTENT", 0), device))
    launch(_gate_up_kernel)[(programs or gate_up_tiles,)](
        x, w1, h, sorted_pair_ids, block_expert, S, H, inter, num_blocks, E * two_i,
        x.stride(0), w1.stride(0), w1.stride(1), h.stride(0),
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, H_SORTED=h_sorted, PRECISION=precision,
        W_TMA=(2 if cfg.get("W_PAIR", False) else 1) if gate_up_tma else 0, X_TMA=x_tma,
        H_TMA=gate_up_tma and h_sorted and bool(cfg.get("H_STORE_TMA", False)), NUM_PROGRAMS=programs,
        num_warps=warps,
        num_stages=stages)
    if grouped == "down":  # padding rows of h hold garbage: their output rows are never read
        y = _grouped_mm_fn()(h, w2.transpose(1, 2), offs=padded_ends)
        rows = torch.empty(S + 1, dtype=torch.int32, device=device)  # row S: every padding row lands here
        rows.scatter_(0, sorted_pair_ids.to(torch.int64),
                      torch.arange(sorted_pair_ids.numel(), dtype=torch.int32, device=device))
        return _topk_sum(y, rows, topk_weights, T, hidden.dtype, launch)
    if split_k == 1:
        pair_out = _empty(S, H, dtype=torch.float32, device=device)
    else:  # split-K adds partial sums atomically
        pair_out = torch.zeros(S, H, dtype=torch.float32, device=device)
    launch(_down_kernel)[(num_blocks * triton.cdiv(H, down_bn), split_k)](
        h, w2, pair_out, topk_weights, sorted_pair_ids, block_expert, S, H, inter, num_blocks, h.shape[0], E * H,
        h.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0), k_per_split,
        BLOCK_M=bm, BLOCK_N=down_bn, BLOCK_K=down_bk, SPLIT_K=split_k, GROUP_M=cfg.get("DOWN_GROUP_M", group_m),
        H_SORTED=h_sorted, PRECISION=precision, W_TMA=down_tma, H_TMA=down_tma and h_sorted,
        num_warps=down_warps, num_stages=down_stages)
    return pair_out.view(T, top_k, H).sum(dim=1).to(hidden.dtype)


_EPILOGUE_BLOCK = 1024  # columns per program of the grouped_mm tier's SiLU-and-multiply and top-k sum


def _topk_sum(y, rows, topk_weights, T, dtype, launch):
    """out[t] = sum_j w[t, j] * y[rows[t * k + j]] (fp32 sum, one cast)."""
    top_k, H = topk_weights.shape[1], y.shape[1]
    out = _empty(T, H, dtype=dtype, device=y.device)
    launch(_topk_sum_kernel)[(T, triton.cdiv(H, _EPILOGUE_BLOCK))](
        y, rows, topk_weights, out, H, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_N=_EPILOGUE_BLOCK)
    return out


def _grouped_mm_moe(hidden, topk_weights, topk_ids, w_gate_up, w_down, launch):
    """The prefill tier on CUTLASS: pairs sorted by expert (no padding), x gathered into that order, the two grouped
    GEMMs by `torch._grouped_mm` (offs = each expert's cumulative row end), SiLU-and-multiply and the weighted top-k
    sum as small Triton kernels."""
    T, H = hidden.shape
    E, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    order, offs, rows = sort_pairs_by_expert(topk_ids, E)
    x = hidden.to(w_gate_up.dtype).index_select(0, order // top_k)
    grouped_mm = _grouped_mm_fn()
    gate_up = grouped_mm(x, w_gate_up.contiguous().transpose(1, 2), offs=offs)  # [S, 2I]
    h = _empty(order.numel(), inter, dtype=w_gate_up.dtype, device=hidden.device)
    launch(_silu_mul_kernel)[(order.numel(), triton.cdiv(inter, _EPILOGUE_BLOCK))](
        gate_up, h, inter, gate_up.stride(0), h.stride(0), BLOCK_N=_EPILOGUE_BLOCK)
    y = grouped_mm(h, w_down.contiguous().transpose(1, 2), offs=offs)  # [S, H]
    return _topk_sum(y, rows, topk_weights, T, hidden.dtype, launch)


if HAS_TRITON:
    from torch.library import triton_op, wrap_triton

    @triton_op("sqcompile::fused_moe_triton", mutates_args=())
    def fused_moe_triton(hidden: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
                         w_down: torch.Tensor, top_k: int, renormalize: bool,
                         routing: str = "softmax") -> torch.Tensor:
        """Fused MoE, Triton implementation (same contract as `fused_moe`)."""
        _check(hidden, router_logits, w_gate_up, w_down, top_k, routing)
        from .decode_attention import wrap_interpreted

        launch = wrap_triton if hidden.is_cuda else wrap_interpreted
        return _fused_moe_triton_impl(hidden, router_logits, w_gate_up, w_down, top_k, renormalize,
                                      routing, launch)

    @triton_op("sqcompile::fused_experts_triton", mutates_args=())
    def fused_experts_triton(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                             w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """`fused_experts`, Triton implementation (the fused MoE's expert kernels on the model's own routing)."""
        _check_experts(hidden, topk_weights, topk_ids, w_gate_up, w_down)
        from .decode_attention import wrap_interpreted

        launch = wrap_triton if hidden.is_cuda else wrap_interpreted
        return _fused_experts_triton_impl(hidden, topk_weights.float().contiguous(),
                                          topk_ids.to(torch.int32).contiguous(), w_gate_up, w_down, launch)
else:  # pragma: no cover
    fused_moe_triton = fused_experts_triton = None

if fused_moe_triton is not None and _interpreting():
    # On a GPU the triton_op traces its own body (Inductor sees the kernels); the interpreter's kernels
    # are not traceable, so under TRITON_INTERPRET=1 tracing uses this shape-only fake instead.
    @fused_moe_triton.register_fake
    def _(hidden, router_logits, w_gate_up, w_down, top_k, renormalize, routing="softmax"):
        _check(hidden, router_logits, w_gate_up, w_down, top_k, routing)
        return hidden.new_empty(hidden.shape)

    @fused_experts_triton.register_fake
    def _(hidden, topk_weights, topk_ids, w_gate_up, w_down):
        _check_experts(hidden, topk_weights, topk_ids, w_gate_up, w_down)
        return hidden.new_empty(hidden.shape)

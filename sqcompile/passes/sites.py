"""Records of what the detection passes found: one `Site` per attention, MoE or (hybrid models) other token-mixing
block."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Site:
    """One attention or MoE block found in an FX graph.

    `rewritten` is True once a pass changed the graph for this site; `reason` says why a site was
    left alone (None when rewritten). `nodes` holds the FX nodes the passes need (not printed).
    """

    layer: int
    kind: str  # "attention" | "moe" | "mixer" (a hybrid model's state-space / linear-attention block: reported only)
    rewritten: bool = False
    reason: Optional[str] = None
    # attention fields
    form: Optional[str] = None  # "sdpa" | "eager" | "eager+sinks" | ...; a mixer: its module's class name
    q_heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    kv_write: Optional[str] = None  # "index_copy" | "cat" | "direct" | None
    rope: bool = False
    rotation: bool = False
    o_proj_folded: bool = False
    # where o_proj cannot absorb the inverse value rotation (a gated output): "at the read (<why not o_proj>)", the
    # inverse applied to the attention output by `insert_output_rotation`
    output_rotation: Optional[str] = None
    quantized: bool = False
    kernel: Optional[str] = None  # which kernel path serves the site, if substituted
    # moe fields
    experts: Optional[int] = None
    top_k: Optional[int] = None
    hidden: Optional[int] = None
    ffn: Optional[int] = None
    routing: Optional[str] = None  # "softmax" | "sigmoid"
    moe_form: Optional[str] = None  # "loop" | "grouped_mm" | "batched_mm"
    graph: int = 0  # index of the compiled graph the site was found in
    nodes: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def leave(self, reason: str) -> "Site":
        """Mark the site as left untouched, with the reason (logged once by the backend)."""
        self.rewritten = False
        self.reason = reason
        return self

"""Simulate the compressed cache at the KV write: quantize the rotated key and value, store the dequantized values.

Runs after the rotation passes, so the fresh key and value are already in the codec's storage coordinates.
With a plain HF cache (StaticCache, DynamicCache) this gives the compressed cache's quality, not its memory
savings; `SpectralCache` stores the packed codes. The quantizer enters the graph as the custom op
`sqcompile::fake_quant` with its codebooks as graph constants, so Inductor can lower the graph around it.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import dequantize as _ops  # noqa: F401  (registers sqcompile::fake_quant)
from ..kernels._bitplanes import kernel_args
from .fx_utils import add_constant, meta_tensor
from .sites import Site


def insert_kv_quantization(gm: fx.GraphModule, site: Site, codec) -> None:
    """Insert `sqcompile::fake_quant` on the rotated key and value of `site`, before the cache write."""
    for kind, node in (("key", site.nodes["key_store"]), ("value", site.nodes["new_v"])):
        fmt = codec.format(kind, site.layer)
        groups, codebooks, channel_scale = kernel_args(fmt)
        t = meta_tensor(node)
        device = t.device if t is not None else torch.device("cpu")
        users = list(node.users)
        anchor = node.next
        cb = add_constant(gm, f"sq_{kind}_codebooks", codebooks.to(device), anchor)
        cs = add_constant(gm, f"sq_{kind}_channel_scale", channel_scale.to(device), anchor)
        with gm.graph.inserting_before(anchor):
            q = gm.graph.call_function(torch.ops.sqcompile.fake_quant.default,
                                       (node, cb, cs, list(groups), int(fmt.head_dim)))
        for u in users:
            u.replace_input_with(node, q)
    site.quantized = True

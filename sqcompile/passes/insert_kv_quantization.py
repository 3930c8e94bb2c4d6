"""Simulate the compressed cache at the KV write: quantize the rotated key and value, store the dequantized values.

Runs after the rotation passes, so the fresh key and value are already in the codec's storage coordinates.
With a plain HF cache (StaticCache, DynamicCache) this gives the compressed cache's quality, not its memory
savings; `SpectralCache` stores the packed codes.
"""
from __future__ import annotations

import functools

import torch.fx as fx

from .sites import Site


def insert_kv_quantization(gm: fx.GraphModule, site: Site, codec) -> None:
    """Insert `codec.fake_quant` on the rotated key and value of `site`, before the cache write."""
    for kind, node in (("key", site.nodes["key_store"]), ("value", site.nodes["new_v"])):
        users = list(node.users)
        fn = functools.partial(codec.fake_quant, kind, site.layer)
        fn.__name__ = f"sq_fake_quant_{kind}"  # a readable name in printed graphs
        with gm.graph.inserting_after(node):
            q = gm.graph.call_function(fn, (node,))
        for u in users:
            u.replace_input_with(node, q)
    site.quantized = True

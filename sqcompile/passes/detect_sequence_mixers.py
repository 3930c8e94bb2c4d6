"""Report the token mixers of hybrid models that are not softmax attention, one row per layer: left alone.

Hybrid decoders (Jamba, Bamba, Falcon-H1, Qwen3-Next, LFM2, ...) mix tokens in some layers with a state-space
(Mamba / Mamba-2), linear-attention (Gated DeltaNet) or short-convolution block instead of softmax attention. Their
state (a convolution window and a recurrent state in the model's hybrid cache) is not a KV cache: there is no key
basis to rotate, no value to fold, nothing `SpectralCache` would store. They run as they are; `explain` shows one row
per such block so a user sees every layer accounted for.

Found from the graph, not from model names: a module directly under a decoder layer (dynamo's `nn_module_stack`:
the entry after the first path with a layer index) whose nodes run a 1-D convolution over the tokens (`conv1d`: each
of these blocks has a causal depthwise convolution in front of its recurrence) or read a convolution / recurrent /
SSM state from the cache, and that holds no attention site of the graph.
"""
from __future__ import annotations

import re
from typing import Optional

import torch.fx as fx

from .fx_utils import MODULE_INDEX_RE, is_op
from .sites import Site

_STATE = re.compile(r"(conv_state|ssm_state|recurrent_state)", re.IGNORECASE)
REASON = ("not softmax attention: a state-space / linear-attention / convolution block ({cls}); its state is not a "
          "KV cache (no keys to rotate, no values to fold), so it runs as it is")


def _mixer_of(n: fx.Node) -> Optional[tuple]:
    """(layer, module path, class name) of the module right under the decoder layer `n` was traced in, else None."""
    stack = list((n.meta.get("nn_module_stack") or {}).values())
    for i, (path, _) in enumerate(stack):
        m = MODULE_INDEX_RE.search(str(path))  # a layer index: the path of a decoder layer
        if m and i + 1 < len(stack):
            child, cls = stack[i + 1]
            name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            return int(m.group(1) or m.group(2)), str(child), name.rsplit(".", 1)[-1]
        if m:
            return None
    return None


def detect_sequence_mixers(gm: fx.GraphModule, graph_index: int, attention: list[Site]) -> list[Site]:
    """One left-alone Site (kind "mixer") per state-space / linear-attention / convolution block in `gm`."""
    taken = set()
    for s in attention:
        node = s.nodes.get("attn") or s.nodes.get("attn_candidate")
        where = _mixer_of(node) if isinstance(node, fx.Node) else None
        if where is not None:
            taken.add(where[:2])
    found: dict[tuple, str] = {}
    for n in gm.graph.nodes:
        mixes = is_op(n, "conv1d", "convolution") or (n.op == "placeholder" and _STATE.search(n.name)) or any(
            a.op == "placeholder" and _STATE.search(a.name) for a in n.all_input_nodes)
        if not mixes:
            continue
        where = _mixer_of(n)
        if where is not None and where[:2] not in taken:
            found.setdefault(where[:2], where[2])
    sites = []
    for (layer, _), cls in sorted(found.items()):
        site = Site(layer=layer, kind="mixer", form=cls, graph=graph_index)
        sites.append(site.leave(REASON.format(cls=cls)))
    return sites

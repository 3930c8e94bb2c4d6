"""Small helpers for reading dynamo-captured FX graphs (torch-level ops, parameters as placeholders)."""
from __future__ import annotations

import operator
import re
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F


def op_name(n: Any) -> Optional[str]:
    """A stable name for what a node computes: the method name, or the function's __name__."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_method":
        return str(n.target)
    if n.op == "call_function":
        t = n.target
        if t is operator.getitem:
            return "getitem"
        if isinstance(t, torch._ops.OpOverload):
            return t._opname
        if isinstance(t, torch._ops.OpOverloadPacket):
            return t._qualified_op_name.split("::")[-1]
        return getattr(t, "__name__", str(t))
    if n.op == "call_module":
        return "module"
    return n.op


def is_op(n: Any, *names: str) -> bool:
    return op_name(n) in names


SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
try:
    SDPA_TARGETS.add(torch.ops.aten.scaled_dot_product_attention.default)
except AttributeError:  # pragma: no cover
    pass


def is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in SDPA_TARGETS


def is_linear(n: Any, gm: Optional[fx.GraphModule] = None) -> bool:
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear):
        return True
    if n.op == "call_module" and gm is not None:
        return isinstance(gm.get_submodule(n.target), torch.nn.Linear)
    return False


def arg(n: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The argument at `index` or keyword `name`."""
    if len(n.args) > index:
        return n.args[index]
    return n.kwargs.get(name, default)


def meta_tensor(n: Any) -> Optional[torch.Tensor]:
    """The fake example value dynamo recorded for a node (None where there is none)."""
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("example_value", n.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def static_shape(n: Any) -> Optional[tuple]:
    t = meta_tensor(n)
    if t is None:
        return None
    return tuple(concrete_int(s) for s in t.shape)


def concrete_int(s: Any) -> Optional[int]:
    """An int for a static size, None for a symbolic one. Never calls int() on a SymInt: in a backend that
    would add a guard and specialize the graph (one recompile per decode step)."""
    if isinstance(s, int):
        return s
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return int(s) if is_concrete_int(s) else None


def same_size(a: Any, b: Any) -> bool:
    """Sizes equal without specializing: ints compare, SymInts compare by their symbolic expression (no guard)."""
    ca, cb = concrete_int(a), concrete_int(b)
    if ca is not None or cb is not None:
        return ca == cb
    try:
        return a.node.expr == b.node.expr
    except AttributeError:
        return False


def only_user(n: fx.Node) -> Optional[fx.Node]:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


_LAYER_RE = re.compile(r"layers?[._](?:modules_)?(\d+)(?:[._]|$)")


def layer_from_name(name: str) -> Optional[int]:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


# `.3` or `[3]` after a module name in a module path (not the `[0]` of a dynamo source such as `L['args'][0]`)
MODULE_INDEX_RE = re.compile(r"(?<=\w)(?:\.(\d+)|\[(\d+)\])(?=\.|\[|$)")


def layer_from_module_stack(n: Any) -> Optional[int]:
    """The decoder layer a node was traced in: the first ModuleList index in the path of its innermost module in
    dynamo's `nn_module_stack` (`model.layers.3.self_attn.k_proj`, `transformer.h[3].attn`: 3), whatever the
    model calls its layer list; None where the node has no such metadata (a graph not traced by dynamo)."""
    if not isinstance(n, fx.Node):
        return None
    stack = n.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        m = MODULE_INDEX_RE.search(str(path))
        if m:
            return int(m.group(1) or m.group(2))
    return None


def node_source_name(n: Any) -> str:
    """The name of the parameter or input behind a node (placeholder / get_attr / module target)."""
    if not isinstance(n, fx.Node):
        return ""
    if n.op in ("placeholder", "get_attr", "call_module"):
        return str(n.target)
    return n.name


def tensor_value(gm: fx.GraphModule, n: Any, example_inputs: Optional[list]) -> Optional[torch.Tensor]:
    """The real tensor behind a parameter node: a placeholder's example input or a get_attr constant."""
    if n is None:
        return None
    if not isinstance(n, fx.Node):
        return n if isinstance(n, torch.Tensor) else None
    if n.op == "placeholder":
        if example_inputs is None:
            return None
        ph = placeholders(gm)
        idx = ph.index(n)
        if idx < len(example_inputs) and isinstance(example_inputs[idx], torch.Tensor):
            return example_inputs[idx]
        return None
    if n.op == "call_method" and n.target == "to_local" and isinstance(n.args[0], fx.Node):
        # a tensor-parallel weight: the rank's shard of a DTensor parameter (localize_tensor_parallel)
        v = tensor_value(gm, n.args[0], example_inputs)
        return None if v is None or not hasattr(v, "to_local") else v.to_local()
    if n.op == "get_attr":
        obj: Any = gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def register_constant(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """A buffer `name` on gm holding a tensor a pass made (owned by the compiled graph, not by the user's module).

    Registered as a buffer, so FX's get_attr finds its reference; aot_autograd (Inductor's front end) lifts a
    dynamo graph's buffers to inputs and wants a dynamo source for each, and a buffer made here has none in the
    user's code, so it gets a ConstantSource naming it.
    """
    gm.register_buffer(name, value)
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(f"sqcompile_{name}")


def add_constant(gm: fx.GraphModule, prefix: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Hold `value` on `gm` (a copy owned by the compiled graph) and return a get_attr node reading it."""
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    name = f"{prefix}_{i}"
    register_constant(gm, name, value.detach().clone().contiguous())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def nodes_between(start: fx.Node, stop: fx.Node) -> Iterable[fx.Node]:
    n = start
    while n is not stop and n.op != "output":
        yield n
        n = n.next


def first_in_graph(nodes: list[fx.Node]) -> fx.Node:
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return min(nodes, key=lambda n: order[n])

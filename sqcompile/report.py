"""`explain`: run one forward under the backend and report every site found, rewritten or left alone (and why)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .passes.sites import Site

_COLUMNS = [
    ("graph", "graph"), ("layer", "layer"), ("kind", "kind"), ("form", "form"), ("q_heads", "q-heads"),
    ("kv_heads", "kv-heads"), ("head_dim", "head_dim"), ("kv_write", "KV write"), ("rope", "RoPE"),
    ("rotation", "rotation"), ("o_proj_folded", "o_proj folded"),
    ("output_rotation", "output rotation"), ("quantized", "quantized"),
    ("experts", "experts"), ("top_k", "top-k"), ("kernel", "kernel"), ("rewritten", "rewritten"), ("reason", "reason"),
]


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


@dataclass
class Report:
    """What the backend did: `sites` (one `Site` per attention or MoE block per compiled graph) and `plans`, the
    `sqcompile.kernels.KernelPlan` each compiled graph ran with (which implementation every inserted op runs)."""

    sites: list[Site] = field(default_factory=list)
    plans: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # about the cache, e.g. its layers kept exact (uncompressed)

    def note_exact_layers(self, exact_layers: dict[int, str]) -> None:
        """Record the layers a `SpectralCache` keeps exact and uncompressed ({layer: reason}), once per reason."""
        by_reason: dict[str, list[int]] = {}
        for layer, reason in sorted(exact_layers.items()):
            by_reason.setdefault(reason, []).append(layer)
        for reason, layers in by_reason.items():
            note = f"SpectralCache keeps layers {layers} exact (uncompressed): {reason}"
            if note not in self.notes:
                self.notes.append(note)

    def add(self, sites: list[Site], plan: Any) -> None:
        """What the backend calls for each graph it compiles while `explain` runs."""
        self.sites.extend(sites)
        if plan not in self.plans:
            self.plans.append(plan)

    @property
    def kernels(self) -> Optional[str]:
        """The kernel path chosen ("torch" | "triton" | "tensorrt"; several joined by ", "), None before a compile."""
        paths = list(dict.fromkeys(p.path for p in self.plans))
        return ", ".join(paths) if paths else None

    def by_kind(self, kind: str, graph: Optional[int] = None) -> list[Site]:
        return [s for s in self.sites if s.kind == kind and (graph is None or s.graph == graph)]

    @property
    def graphs(self) -> list[int]:
        return sorted({s.graph for s in self.sites})

    def __str__(self) -> str:
        head = "".join(f"sqcompile: {p}\n" for p in self.plans) + "".join(f"sqcompile: {n}\n" for n in self.notes)
        if not self.sites:
            return head + "sqcompile: no attention or MoE sites found"
        cols = [(k, h) for k, h in _COLUMNS if any(getattr(s, k) not in (None, False) for s in self.sites)
                or k in ("layer", "kind", "rewritten")]
        rows = [[_cell(getattr(s, k)) for k, _ in cols] for s in sorted(self.sites, key=lambda s: (s.graph, s.kind, s.layer))]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (_, h) in enumerate(cols)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
        out = ([head.rstrip()] if head else []) + [line([h for _, h in cols]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in rows]
        rewritten = sum(s.rewritten for s in self.sites)
        out.append(f"{len(self.sites)} sites, {rewritten} rewritten")
        return "\n".join(out)


def explain(model: Any, *args: Any, options: Optional[dict] = None, **kwargs: Any) -> Report:
    """Compile `model` (an nn.Module or a callable) with the backend, run it once on the inputs, and report.

    Options are the backend's; `lower` defaults to "eager" here (the report does not depend on it).
    """
    from . import backend

    opts = dict(options or {})
    opts.setdefault("lower", "eager")
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    report = Report()
    compiled = torch.compile(fn, backend=backend.recording_backend(report), options=opts)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return report

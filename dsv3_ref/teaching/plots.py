"""Drawing helpers for the notebooks, so that a notebook cell shows the idea and not the matplotlib code.

- `all_to_all(indices, token_rank, n_local)`: expert parallelism's dispatch and combine for a few tokens
  (notebook 30_moe_routing, section 5);
- `pipeline_schedules(schedules)`: one timeline per pipeline schedule, a row per rank (90_scale, section 6);
- `figure_control(draw, **controls)`: a figure redrawn by a plain function whenever one of its ipywidgets controls
  changes (40_load_balancing, section 4); `png(fig)` renders a figure for it.

matplotlib and ipywidgets come with the `notebooks` extra and are imported inside the functions: nothing in the
model imports this module, and importing it needs neither.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import torch

PIPELINE_COLORS = {"F": "#4c72b0", "B": "#dd8452", "BI": "#f2b880", "W": "#55a868", "F&B": "#8172b3"}
RANK_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def all_to_all(indices: torch.Tensor, token_rank: torch.Tensor, n_local: int) -> Any:
    """The two all-to-alls of an expert-parallel MoE layer: each token (left) goes once to every rank that owns one of
    its experts (dispatch), and each such rank's partial sum comes back (combine, dashed).

    indices (N, K): the experts each token chose; token_rank (N,): the rank that holds each token; n_local: experts
    per rank (rank r owns experts r*n_local .. (r+1)*n_local - 1). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    n_tok, world = len(indices), int(token_rank.max()) + 1
    if world > len(RANK_COLORS):
        raise ValueError(f"all_to_all draws at most {len(RANK_COLORS)} ranks, token_rank has {world}")
    fig, ax = plt.subplots(figsize=(11, 4.6))
    y_tok = {t: n_tok - 1 - t for t in range(n_tok)}
    y_rank = {r: (n_tok - 1) - (r + 0.5) * n_tok / world + 0.5 for r in range(world)}
    for r in range(world):  # the ranks, with the experts they own
        ax.axhspan(y_rank[r] - n_tok / world / 2, y_rank[r] + n_tok / world / 2, color=RANK_COLORS[r], alpha=0.06)
        ax.add_patch(FancyBboxPatch((1.75, y_rank[r] - 0.6), 0.5, 1.2, boxstyle="round,pad=0.05", fc="white",
                                    ec=RANK_COLORS[r], lw=2))
        ax.text(2.0, y_rank[r], f"rank {r}\nexperts {r * n_local}-{(r + 1) * n_local - 1}", ha="center",
                va="center", fontsize=9)
        ax.text(-1.55, y_rank[r], f"rank {r}\ntokens", ha="left", va="center", fontsize=10, color=RANK_COLORS[r])
    for t in range(n_tok):  # each token: one arrow per destination rank out, one dashed partial sum back
        src = int(token_rank[t])
        ax.text(0, y_tok[t], f"t{t} -> " + ", ".join(f"e{int(e)}" for e in indices[t]), ha="right", va="center",
                fontsize=9, color=RANK_COLORS[src])
        ax.text(4.0, y_tok[t], f"t{t} out", ha="left", va="center", fontsize=9, color=RANK_COLORS[src])
        for dst in sorted(set((indices[t] // n_local).tolist())):
            ax.annotate("", xy=(1.72, y_rank[dst]), xytext=(0.05, y_tok[t]),
                        arrowprops=dict(arrowstyle="->", color=RANK_COLORS[src], lw=1.4))
            ax.annotate("", xy=(3.95, y_tok[t]), xytext=(2.28, y_rank[dst]),
                        arrowprops=dict(arrowstyle="->", color=RANK_COLORS[dst], lw=1.4, ls="--"))
    ax.axhline((n_tok - 1) / 2, color="k", ls=":", lw=1)
    ax.text(0.9, n_tok - 0.4, "dispatch (all-to-all 1)", ha="center", fontsize=10)
    ax.text(3.1, n_tok - 0.4, "combine (all-to-all 2)", ha="center", fontsize=10)
    ax.set(xlim=(-1.6, 4.8), ylim=(-0.8, n_tok))
    ax.axis("off")
    fig.tight_layout()
    return fig


def pipeline_schedules(schedules: Mapping[str, Any]) -> Any:
    """One timeline per schedule (`dsv3_ref.systems.pipeline.schedule` results), a row per rank: forward (F),
    backward (B, or BI + W when split), F&B pairs drawn once; DualPipe's direction-1 micro-batches hatched; the
    numbers are micro-batch indices. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(schedules), 1, figsize=(12, 8 * len(schedules) / 3), sharex=True, squeeze=False)
    for ax, s in zip(axes[:, 0], schedules.values(), strict=True):
        for rank, ops in enumerate(s.by_rank()):
            for op in ops:
                if op.overlapped and op.op == "B":  # an F&B pair: drawn once, with its forward
                    continue
                kind = "F&B" if op.overlapped else op.op
                ax.barh(rank, op.end - op.start, left=op.start, color=PIPELINE_COLORS[kind], edgecolor="black",
                        linewidth=0.4, hatch="///" if op.direction == 1 and not op.overlapped else None)
                ax.text((op.start + op.end) / 2, rank, str(op.microbatch), ha="center", va="center", fontsize=5)
        ax.set_yticks(range(s.pp), [f"rank {r}" for r in range(s.pp)], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{s.method}: bubble {s.bubble:g}, makespan {s.makespan:g}", fontsize=9)
    axes[-1, 0].set_xlabel("time (units of F)")
    handles = [Patch(color=c, label=k) for k, c in PIPELINE_COLORS.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="direction 1"))
    fig.legend(handles=handles, loc="upper center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def png(fig: Any, dpi: int = 72) -> bytes:
    """The figure as PNG bytes (for an ipywidgets Image); closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def figure_control(draw: Callable[..., Any], **controls: Any) -> Any:
    """A widget: the given ipywidgets controls above the figure `draw(**values)` returns, redrawn whenever a control
    changes (also when its value is set from code). The figure is drawn once now."""
    import ipywidgets as widgets

    if not controls:
        raise ValueError("figure_control needs at least one control, e.g. gamma=widgets.FloatLogSlider(...)")
    picture = widgets.Image(format="png")

    def redraw(change: Any = None) -> None:
        picture.value = png(draw(**{name: c.value for name, c in controls.items()}))

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(controls.values())), picture])

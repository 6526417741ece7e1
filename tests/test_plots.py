"""dsv3_ref.teaching.plots: the notebooks' drawing helpers return figures with what they should show, and the
figure control redraws when a control changes (also from code)."""

import pytest
import torch

plt = pytest.importorskip("matplotlib.pyplot")
widgets = pytest.importorskip("ipywidgets")

from matplotlib.text import Annotation  # noqa: E402

from dsv3_ref.systems import pipeline as pl  # noqa: E402
from dsv3_ref.teaching import plots  # noqa: E402


def test_all_to_all_draws_one_arrow_pair_per_destination():
    indices = torch.tensor([[1, 3], [2, 6], [5, 7], [0, 4], [6, 7], [1, 2]])
    fig = plots.all_to_all(indices, torch.tensor([0, 0, 0, 1, 1, 1]), 4)
    [ax] = fig.axes
    destinations = sum(len(set((row // 4).tolist())) for row in indices)
    arrows = [a for a in ax.texts if isinstance(a, Annotation) and a.arrow_patch is not None]
    assert len(arrows) == 2 * destinations  # dispatch and combine
    plt.close(fig)
    with pytest.raises(ValueError, match="at most 4 ranks"):
        plots.all_to_all(torch.tensor([[0]] * 5), torch.arange(5), 1)


def test_pipeline_schedules_one_row_of_bars_per_rank():
    d = pl.Durations(F=1, B=2, W=1, FB=2.5)
    runs = {m: pl.schedule(m, 4, 8, d) for m in pl.METHODS}
    fig = plots.pipeline_schedules(runs)
    assert len(fig.axes) == len(runs)
    for ax, s in zip(fig.axes, runs.values(), strict=True):
        assert ax.get_title().startswith(s.method) and len(ax.get_yticks()) == 4 and len(ax.patches) > 0
    plt.close(fig)


def test_figure_control_redraws_on_every_change():
    calls = []

    def draw(gamma, rule):
        calls.append((gamma, rule))
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, gamma])
        return fig

    slider, menu = widgets.FloatSlider(value=0.5), widgets.Dropdown(options=["a", "b"], value="a")
    box = plots.figure_control(draw, gamma=slider, rule=menu)
    picture = box.children[1]
    assert calls == [(0.5, "a")] and bytes(picture.value).startswith(b"\x89PNG")
    slider.value = 0.25
    menu.value = "b"
    assert calls[1:] == [(0.25, "a"), (0.25, "b")]
    with pytest.raises(ValueError, match="at least one control"):
        plots.figure_control(draw)

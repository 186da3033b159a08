"""paper_repro.core.plot: the palette is distinct, legends sit outside the data, helpers refuse bad input."""
import matplotlib.pyplot as plt
import numpy as np
import pytest

from paper_repro.core.plot import (PALETTE, REFERENCE, _lab, heatmap, interval_yerr, legend_outside, method_colors,
                                   method_markers, min_color_distance, new_figure, nonnegative)


def test_palette_is_distinct_and_not_the_reference():
    assert min_color_distance(PALETTE) > 15
    assert REFERENCE not in PALETTE
    assert min_color_distance(["#00AA00", "#00AB00"]) < 1   # the measure itself separates near-identical greens


def test_lab_of_primary_matches_the_cie_reference():
    assert np.allclose(_lab("#FF0000"), [53.24, 80.09, 67.20], atol=0.05)


def test_colors_and_markers_are_stable_and_bounded():
    names = [f"m{i}" for i in range(len(PALETTE))]
    assert method_colors(names) == method_colors(names) and len(set(method_colors(names).values())) == len(names)
    assert len(set(method_markers(names).values())) == len(names)
    with pytest.raises(ValueError, match="only 16 distinguishable colours"): method_colors(names + ["one more"])


@pytest.mark.parametrize("where", ["right", "below"])
def test_figure_legend_is_outside_every_axes(where):
    fig, axes = new_figure(1, 2)
    for ax in axes:
        for i in range(4): ax.plot([0, 1], [i, i], label=f"method {i}")
    leg = legend_outside(fig, where=where)
    fig.canvas.draw()
    box = leg.get_window_extent()
    for ax in axes: assert not box.overlaps(ax.get_window_extent())
    assert len(leg.get_texts()) == 4 and all(ax.get_legend() is None for ax in axes)
    plt.close(fig)


def test_bad_inputs_name_the_problem():
    fig, ax = new_figure()
    with pytest.raises(ValueError, match="where='left'; valid: right, below"): legend_outside(ax, where="left")
    with pytest.raises(ValueError, match="axis='z'"): nonnegative(ax, "z")
    with pytest.raises(ValueError, match="contain its value"): interval_yerr([1.0], [1.5], [2.0])
    with pytest.raises(ValueError, match="ncols=0"): new_figure(1, 0)
    with pytest.raises(ValueError, match="1 row and 2 column labels"): heatmap(ax, [[1, 2, 3]], "ab", "r", "x")
    plt.close(fig)

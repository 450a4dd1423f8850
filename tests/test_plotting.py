"""benchmarks/plotting.py: distinct shapes get distinct x positions with their own labels (two shapes of the same
size used to share one point and one label), and the log-time axis carries readable tick labels."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from benchmarks import plotting as P  # noqa: E402

# two of bench_rope's GPU shapes hold the same number of elements (2^29)
ROPE_A, ROPE_B = (32, 1024, 16, 16, 64), (8, 2048, 32, 8, 128)


def _rows(shapes, times=(0.3, 0.5, 0.9)):
    rows = []
    for shape, t in zip(shapes, times):
        for prov, f in (("eager", 1.0), ("triton", 0.25)):
            rows.append(dict(op="apply_rope", shape=shape, dtype="bfloat16", mode="fwd", provider=prov, ms=t * f,
                             gbps=100.0 / (t * f)))
    return rows


def _xticks(ax):
    ax.figure.canvas.draw()
    return {round(t, 6): lab.get_text() for t, lab in zip(ax.get_xticks(), ax.get_xticklabels())}


def test_shapes_of_equal_size_get_their_own_positions_and_labels():
    rows = _rows([(8, 1024, 16, 16, 64), ROPE_A, ROPE_B])
    pos, log_axis = P.x_positions(rows)
    assert not log_axis and len(set(pos.values())) == 3
    fig = P.make_figure("apply_rope", rows)
    try:
        for ax in fig.axes:
            labels = sorted(_xticks(ax).values())
            assert labels == sorted(["8x1024x16x16x64", "32x1024x16x16x64", "8x2048x32x8x128"])
            xs = {x for line in ax.get_lines() for x in line.get_xdata()}
            assert len(xs) == 3  # each shape at its own x, not two on one point
    finally:
        plt.close(fig)


def test_unique_sizes_keep_a_log_size_axis():
    rows = _rows([(4, 256), (4, 1024), (4, 4096)])
    pos, log_axis = P.x_positions(rows)
    assert log_axis and pos == {"4x256": 1024.0, "4x1024": 4096.0, "4x4096": 16384.0}
    fig = P.make_figure("apply_rope", rows)
    try:
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and sorted(_xticks(ax).values()) == ["4x1024", "4x256", "4x4096"]
    finally:
        plt.close(fig)


@pytest.mark.parametrize("times", [(0.3, 0.5, 0.9), (0.01, 1.0, 100.0), (0.2501, 0.2503, 0.2507)])
def test_log_time_axis_has_labelled_ticks(times):
    fig = P.make_figure("apply_rope", _rows([(4, 256), (4, 1024), (4, 4096)], times))
    try:
        ax = fig.axes[0]
        assert ax.get_yscale() == "log"
        fig.canvas.draw()
        lo, hi = ax.get_ylim()
        labels = [(t, lab.get_text()) for t, lab in zip(ax.get_yticks(), ax.get_yticklabels()) if lo <= t <= hi]
        assert len(labels) >= 2 and all(text for _, text in labels), labels
        assert ax.yaxis.get_minor_locator().tick_values(lo, hi) == []  # no unlabelled minor ticks left over
    finally:
        plt.close(fig)


def test_log_ticks():
    assert P.log_ticks(0.01, 100) == [0.01, 0.1, 1.0, 10.0, 100.0]
    assert P.log_ticks(0.15, 3.0) == [0.2, 0.5, 1.0, 2.0]
    narrow = P.log_ticks(0.225, 0.29)
    assert len(narrow) >= 2 and all(0.225 <= t <= 0.29 for t in narrow)
    with pytest.raises(ValueError, match="positive"):
        P.log_ticks(0.0, 1.0)


def test_extrapolated_and_not_comparable_rows_are_marked():
    rows = [dict(op="pack", shape={"docs": 10}, provider="cpp", ms=1.0),
            dict(op="pack", shape={"docs": 10}, provider="python", ms=40.0, extrapolated="from 1 doc"),
            dict(op="pack", shape={"docs": 10}, provider="fused", ms=0.1, not_comparable="other work")]
    fig = P.make_figure("pack", rows)
    try:
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == ["cpp", "fused (not comparable)", "python (extrapolated)"]
    finally:
        plt.close(fig)


def test_legend_outside_the_panels_colours_per_provider_and_labelled_x_axis():
    """The attention plot's per-panel legend (loc="best") covered the eager-sinks line; the x axis had no label."""
    rows = _rows([(4, 256), (4, 1024), (4, 4096)])
    rows += [dict(r, mode="bwd") for r in rows if r["provider"] == "triton"]  # eager missing from the bwd panels
    rows += [dict(op="apply_rope", shape=(4, 256), dtype="bfloat16", mode="bwd", provider="eager", ms=1.0)]  # no GB/s
    fig = P.make_figure("apply_rope", rows)
    try:
        fig.canvas.draw()
        assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
        legend_box = fig.legends[0].get_window_extent()
        assert not any(legend_box.overlaps(ax.get_window_extent()) for ax in fig.axes)
        assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["eager", "triton"]
        colours = {}
        for ax in fig.axes:
            for line in ax.get_lines():
                colours.setdefault(line.get_label(), set()).add(line.get_color())
        assert all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == 2, colours
        bottom = fig.axes[len(fig.axes) // 2:]
        assert all(ax.get_xlabel() for ax in bottom), [ax.get_xlabel() for ax in bottom]
    finally:
        plt.close(fig)

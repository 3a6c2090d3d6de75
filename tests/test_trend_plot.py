"""The nightly trend plot draws every span of history without matplotlib's complaints."""

import warnings

import pandas as pd
import pytest

from mlxchat.evaluation.published import plot_trend


@pytest.mark.parametrize("span", ["0s", "1500ms", "3min", "3h", "3D", "800D"])
def test_trend_plot_has_ticks_for_any_span(tmp_path, span):
    start = pd.Timestamp("2026-12-02 05:00:00", tz="UTC")
    when = [start, start + pd.Timedelta(span) / 2, start + pd.Timedelta(span)]
    history = pd.DataFrame({"timestamp": when, "val_bpb": [1.2, 1.1, 1.0],
                            "core_metric": [0.10, 0.12, 0.15], "chatcore": [None, None, None]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # AutoDateLocator warns where it cannot place ticks
        out = plot_trend(history, tmp_path / "trend.png")
    assert out.stat().st_size > 1000

"""Generation statistics: hand-computed values, numpy agreement, comparison tables, JSON and the PNG histogram."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from alignment.inference.stats import (
    PERCENTILES,
    STATISTICS,
    Metric,
    comparison_table,
    describe,
    plot_histograms,
    print_summary,
    save_summary,
    summarize,
)


def test_describe_hand_values() -> None:
    """Hand values for [1, 2, 3, 4].

    Mean 2.5, population variance (2.25+0.25+0.25+2.25)/4 = 1.25; percentile rank r = q/100·3 interpolates linearly
    between sorted values, e.g. p3: r = 0.09 -> 1.09, p25: r = 0.75 -> 1.75, p97: r = 2.91 -> 3.91.
    """
    stats = describe([4.0, 1.0, 3.0, 2.0])
    expected = {
        "count": 4.0,
        "mean": 2.5,
        "std": 1.25**0.5,
        "min": 1.0,
        "max": 4.0,
        "p3": 1.09,
        "p10": 1.3,
        "p25": 1.75,
        "p50": 2.5,
        "p75": 3.25,
        "p90": 3.7,
        "p97": 3.91,
    }
    assert list(stats) == list(STATISTICS)
    assert stats == pytest.approx(expected, abs=1e-12)


def test_describe_single_value_and_empty() -> None:
    """One value: every location statistic is that value and the spread is 0; no values: only the count."""
    stats = describe([-0.5])
    assert stats.pop("count") == 1.0
    assert stats.pop("std") == 0.0
    assert set(stats.values()) == {-0.5}
    assert describe([]) == {"count": 0.0}


def test_describe_matches_numpy_on_random_values() -> None:
    values = np.random.default_rng(0).normal(3.0, 2.0, size=257)
    stats = describe(values.tolist())
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["std"] == pytest.approx(values.std(ddof=0))
    for q in PERCENTILES:
        assert stats[f"p{q}"] == pytest.approx(np.percentile(values, q))
    assert stats["p50"] == pytest.approx(np.median(values))


def _values() -> dict[str, dict[Metric, list[float]]]:
    return {
        "model-a": {Metric.reward: [0.1, 0.5, 0.9], Metric.length_chars: [10, 20, 30], Metric.length_tokens: [3, 5, 7]},
        "model-b": {Metric.reward: [-1.0, 0.0], Metric.length_chars: [5, 5], Metric.length_tokens: [1, 1]},
    }


def test_comparison_table_puts_models_side_by_side() -> None:
    summary = summarize(_values())
    table = comparison_table(summary, Metric.reward)
    assert [c.header for c in table.columns] == ["statistic", "model-a", "model-b"]
    assert list(table.columns[0].cells) == list(STATISTICS)
    mean_row = STATISTICS.index("mean")
    assert list(table.columns[1].cells)[mean_row] == "0.5000"
    assert list(table.columns[2].cells)[mean_row] == "-0.5000"
    console = Console(record=True, width=200)
    print_summary(summary, console)
    text = " ".join(console.export_text().split())  # long titles wrap over narrow tables
    assert "Reward by generator model" in text
    assert "Response length (tokens) by generator model" in text


def test_save_summary_round_trips(tmp_path: Path) -> None:
    summary = summarize(_values())
    save_summary(summary, tmp_path / "stats.json")
    loaded = json.loads((tmp_path / "stats.json").read_text())
    assert loaded["model-b"]["length_chars"]["mean"] == 5.0
    assert loaded["model-a"]["reward"]["p50"] == pytest.approx(0.5)


def test_plot_histograms_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "hist.png"
    plot_histograms({**_values(), "empty": {Metric.reward: []}}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000

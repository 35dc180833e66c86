"""The pure parts of the `make bench` harness: trial summaries, ratios, counters read from outside."""

from __future__ import annotations

import os

from tests.bench import harness as h
from tests.bench.run import _package


def test_summary_and_ratios_pair_each_trial_with_its_baseline() -> None:
    fig = h.Figure("rotations/s", "rot/s", measured=[10.0, 30.0, 20.0], baseline=[100.0, 100.0, 50.0])
    assert h.summary(fig.measured) == {"min": 10.0, "median": 20.0, "max": 30.0}
    assert fig.ratios == [0.1, 0.3, 0.4]
    data = fig.as_json()
    assert data["ratio_summary"] == {"min": 0.1, "median": 0.3, "max": 0.4}
    assert "10.0 / 20.0 / 30.0" in fig.row()


def test_a_figure_without_baseline_prints_a_dash() -> None:
    fig = h.Figure("queue messages per rotation", "msgs", measured=[7.0])
    assert fig.as_json()["baseline_summary"] is None
    assert "—" in fig.row()


def test_provider_counts_split_answers_by_status() -> None:
    stats = {"routes": {"issue": {"201": 5, "429": 2}, "revoke": {"204": 5}, "list": {"200": 5, "500": 1}}, "requests": 18}
    counts = h.provider_counts(stats)
    assert counts == {"issue": 7, "revoke": 5, "list": 6, "total": 18, "429": 2, "ok": 15, "answered": 16}
    assert h.diff(counts, {"issue": 2, "total": 3})["issue"] == 5


def test_cpu_and_rss_of_a_process_tree_are_read_from_proc() -> None:
    pid = os.getpid()
    assert pid in h.tree_pids(pid)
    assert h.tree_cpu_s(pid) > 0
    assert h.tree_rss_kib(pid) > 0


def test_metric_labels_are_summed_per_label_value() -> None:
    metrics = {'keyrotor_step_duration_seconds_count{step="issue"}': 2.0, 'keyrotor_step_duration_seconds_count{step="verify"}': 1.0,
               'keyrotor_step_duration_seconds_sum{step="issue"}': 0.5}
    assert h.by_label(metrics, "keyrotor_step_duration_seconds_count", "step") == {"issue": 2.0, "verify": 1.0}
    assert h.metric_sum(metrics, "keyrotor_step_duration_seconds_count") == 3.0


def test_profile_samples_are_grouped_by_package() -> None:
    assert _package("/x/.venv/lib/python3.11/site-packages/hvac/api.py:read") == "hvac"
    assert _package(f"{h.REPO}/worker/pipeline/steps/issue.py:run") == "worker/pipeline"
    assert _package("/usr/lib/python3.11/threading.py:wait") == "stdlib:threading"

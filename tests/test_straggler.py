"""Straggler telemetry: which rank slows a multi-rank run (pipeline/throughput.py). Two ranks as two one-rank
"nodes" on this machine (gloo); rank 1's loader made slow by a sitecustomize that its PYTHONPATH alone holds
(a test harness: every setting must agree across ranks, so no setting can slow one rank). One fit holds both
cases, to keep the suite short: its first logging window is balanced, its second has the slow rank."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from pipeline.throughput import (INPUT_BOUND_OVER_MEDIAN, INPUT_BOUND_RATIO, input_bound_line, input_bound_rank,
                                 window_metrics)
from tests.two_nodes import demo_args, fit_as_two_nodes

TIMEOUT_S = 240
SLOW_S = 0.6  # rank 1's extra wait per training batch, from its 7th batch on
# batches 7 and 8 slow steps 7 and 8 (steps 6 and 7 if Lightning fetched one batch ahead): inside the second
# window of 4 steps either way, the first window balanced
SLOW_FROM_BATCH = 7

SLOW_LOADER = (
    "import os, time\n"
    "import torch.utils.data.dataloader as d\n"
    "_real = d._SingleProcessDataLoaderIter._next_data\n"
    "_calls = [0]\n"
    "def _slow(self):\n"
    "    _calls[0] += 1\n"
    "    if _calls[0] >= int(os.environ['TEST_SLOW_FROM_BATCH']):\n"
    "        time.sleep(float(os.environ['TEST_SLOW_LOADER_S']))\n"
    "    return _real(self)\n"
    "d._SingleProcessDataLoaderIter._next_data = _slow\n")


def _fit(shards: Path, run_dir: Path, slow_site: Path | None) -> list[subprocess.CompletedProcess]:
    """An 8-step fit as ranks 0 and 1 of two one-rank nodes, a row every 4 steps; with ``slow_site``, rank 1
    imports its sitecustomize."""
    # the demo's ResNet-20, not the tests' ResNet-8: its step is long beside the in-process loader's batch, as in a
    # real run (ResNet-8's short steps put the balanced window's wait share at 0.21, over the 0.2 that names a rank)
    args = demo_args(shards, run_dir, "--trainer.max_steps", "8", "--trainer.log_every_n_steps", "4",
                     "--data.batch_size", "32", "--trainer.enable_checkpointing", "false",
                     "--model.arch", "cifar_resnet20")
    slow = {} if slow_site is None else {"PYTHONPATH": str(slow_site), "TEST_SLOW_LOADER_S": str(SLOW_S),
                                         "TEST_SLOW_FROM_BATCH": str(SLOW_FROM_BATCH)}
    done = fit_as_two_nodes((args, args), ({}, slow), TIMEOUT_S)
    for rank, r in enumerate(done):
        assert r.returncode == 0, f"rank {rank}:\n{r.stderr[-4000:]}"
    return done


def _perf_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("perf/step_time_s")]


def test_a_rank_with_a_slow_loader_is_named_and_a_balanced_window_names_none(digits_shards, tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_LOADER)
    runs = _fit(digits_shards, tmp_path / "run", site)
    rows = _perf_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == ["3", "7"], rows  # Lightning's rows at global steps 4 and 8
    balanced, slow = rows
    # balanced: no rank far above the other (so no line could come from this row)
    assert float(balanced["perf/data_wait_share_max"]) < INPUT_BOUND_OVER_MEDIAN, balanced
    # rank 1 slow: named, its share far above rank 0's
    assert float(slow["perf/data_wait_share_max_rank"]) == 1.0, slow
    assert float(slow["perf/data_wait_share_max"]) > float(slow["perf/data_wait_share"]) + INPUT_BOUND_OVER_MEDIAN
    # rank 0 waited for rank 1 inside its step: its in-step rate stays near the run's rate, not the no-wait one
    for r in rows:
        assert float(r["perf/img_per_s_in_step_min"]) < 1.3 * float(r["perf/img_per_s_per_rank"]), r
    lines = [ln for ln in runs[0].stderr.splitlines() if ln.startswith("input-bound:")]
    assert len(lines) == 1, runs[0].stderr[-3000:]
    assert lines[0].startswith("input-bound: rank 1 (") and " of the last 4 steps, the median of the other" \
        in lines[0] and lines[0].endswith(": its loader (more data.num_workers, a local copy of the shards, DALI)"), \
        lines[0]
    assert "input-bound:" not in runs[1].stderr  # rank 0 alone prints it
    for r in runs:  # the gather went through torch.distributed.nn (Lightning's all_gather): a warning per rank
        assert "torch.distributed.nn.functional" not in r.stderr, r.stderr[-3000:]


# ---- the arithmetic, without processes ----------------------------------------------------------------------

def test_window_metrics_over_ranks() -> None:
    # (images, wall s, data-wait s) per rank: rank 2 waited 6 s of 10 for data, the others 1 s and 0.5 s
    m = window_metrics([(640.0, 10.0, 1.0), (640.0, 10.0, 0.5), (640.0, 10.0, 6.0)])
    assert m["perf/img_per_s_per_rank"] == pytest.approx(64.0)
    assert m["perf/img_per_s_total"] == pytest.approx(192.0)
    assert m["perf/data_wait_share"] == pytest.approx(0.1)
    assert m["perf/data_wait_share_max"] == pytest.approx(0.6)
    assert m["perf/data_wait_share_max_rank"] == 2.0
    # in-step rate: 640 / (10 - wait): 71.1, 67.4, 160; the lowest is the rank that waited least for data
    assert m["perf/img_per_s_in_step_min"] == pytest.approx(640 / 9.5)
    # equal shares: the lowest rank; a wait longer than the window is a share of 1
    m = window_metrics([(64.0, 1.0, 0.2), (64.0, 1.0, 0.2), (64.0, 1.0, 1.5)])
    assert m["perf/data_wait_share_max_rank"] == 2.0 and m["perf/data_wait_share_max"] == 1.0
    assert window_metrics([(64.0, 1.0, 0.2), (64.0, 1.0, 0.2)])["perf/data_wait_share_max_rank"] == 0.0


def test_input_bound_rank_thresholds() -> None:
    assert input_bound_rank([0.03] * 13 + [0.61] + [0.03] * 2) == (13, pytest.approx(0.03))
    assert input_bound_rank([0.0, 0.6]) == (1, 0.0)  # two ranks: the other one's share, not the mean of both
    assert input_bound_rank([0.05, 0.10, 0.08]) is None  # balanced
    assert input_bound_rank([0.4, 0.45, 0.7]) is None  # every loader too slow: no one straggler (ratio)
    assert input_bound_rank([0.0, 0.0, INPUT_BOUND_OVER_MEDIAN - 0.01]) is None  # small
    assert input_bound_rank([0.1, 0.1, 0.1 * INPUT_BOUND_RATIO - 0.01]) is None  # above by 0.2, not 3x
    assert input_bound_rank([0.1, 0.1, 0.1 * INPUT_BOUND_RATIO + 0.01]) == (2, pytest.approx(0.1))
    assert input_bound_rank([0.9]) is None
    assert input_bound_line(13, "node4", 0.61, 0.03, 50) == (
        "input-bound: rank 13 (node4) waited for data 61% of the last 50 steps, the median of the other ranks 3%: "
        "its loader (more data.num_workers, a local copy of the shards, DALI)")


def test_the_line_comes_again_only_for_another_rank_or_after_the_repeat_time(monkeypatch, caplog) -> None:
    import pipeline.throughput as tp

    clock = [1000.0]
    monkeypatch.setattr(tp.time, "monotonic", lambda: clock[0])
    cb = tp.Throughput()
    cb.hosts, cb.steps = ["a", "b", "c"], 5
    caplog.set_level("INFO", logger="pipeline.throughput")
    for shares, dt in (([0.0, 0.7, 0.0], 0), ([0.0, 0.7, 0.0], 60), ([0.0, 0.0, 0.0], 60), ([0.0, 0.7, 0.0], 60),
                       ([0.0, 0.0, 0.8], 60), ([0.0, 0.0, 0.8], tp.INPUT_BOUND_REPEAT_S)):
        clock[0] += dt
        cb._name_straggler(shares)
    named = [r.getMessage().split(" waited")[0] for r in caplog.records]
    assert named == ["input-bound: rank 1 (b)", "input-bound: rank 2 (c)", "input-bound: rank 2 (c)"], named

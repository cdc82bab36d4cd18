"""The benchmarks run and print the JSON they promise (their figures are read by people, not asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Each benchmark runs for seconds: `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]


def run_bench(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_prompt_benchmark_prints_json() -> None:
    report = run_bench("bench/prompts.py", "--prompts", "300")
    assert report["benchmark"] == "prompts" and report["prompts"] == 300
    assert 0 < report["accepted"] <= 300
    assert report["prompts_per_second"] > 0 and report["baseline_tokenize_only_per_second"] > 0


def test_tiny_model_benchmark_prints_json() -> None:
    report = run_bench("bench/tiny.py", "--sizes", "64", "--runs", "2", "--steps", "3")
    assert report["benchmark"] == "tiny" and [render["size"] for render in report["renders"]] == [64]
    [render] = report["renders"]
    assert render["runs"] == 2 and 0 < render["min_s"] <= render["median_s"] <= render["max_s"]


def test_admission_benchmark_prints_json() -> None:
    report = run_bench("bench/admission.py", "--requests", "200", "--users", "10")
    assert report["benchmark"] == "admission" and report["requests"] == 200
    assert 0 < report["accepted_per_pass"] <= 200 and report["refused_at_the_limit_per_pass"] == 200
    assert report["admissions_per_second"] > 0 and report["baseline_prompt_checks_per_second"] > 0


def test_scheduler_benchmark_prints_json() -> None:
    report = run_bench(
        "bench/scheduler.py",
        *("--jobs", "400", "--users", "20"),
        *("--light-users", "30", "--light-jobs", "4", "--span", "2", "--batch-cost", "0.02", "--image-cost", "0.005"),
        *("--queued", "60", "--fill-users", "15", "--requests", "20", "--settle", "0.5", "--gap", "0.02"),
    )
    assert report["benchmark"] == "scheduler" and report["cpus"] >= 1
    overhead = report["overhead"]
    assert overhead["jobs"] == 400 and overhead["scheduler_ms_per_job"] > 0
    assert overhead["baseline_direct_render_ms_per_job"] > 0
    for run in (report["fairness"]["scheduler"], report["fairness"]["fifo_baseline"]):
        assert 0 < run["jain_index"] <= 1 and run["users"] == 31
        assert 0 <= run["light_wait_mean_ms"] <= run["light_wait_p95_ms"] <= run["light_wait_max_ms"]
        assert run["light_jobs_started"] == 30 * 4 and run["heavy_jobs_started"] > 0
    assert report["fairness"]["light_wait_mean_ratio_fifo_to_fair"] > 0
    ack = report["acknowledgement"]
    assert ack["queued_before"] >= 60 - 8 and ack["requests"] == 20
    assert 0 < ack["ack_p50_ms"] <= ack["ack_p99_ms"] <= ack["ack_max_ms"]
    assert set(report["targets"]) == {"overhead_ms_per_job", "jain_index", "ack_p99_ms"}
    assert all(isinstance(target["met"], bool) for target in report["targets"].values())


def test_engine_benchmark_prints_json_for_a_setting_and_its_profile() -> None:
    report = run_bench(
        "bench/engine.py",
        *("--tiny", "--steps", "2", "--users", "3", "--lone", "2", "--max-batch", "2"),
        *("--configs", "tuned", "--profile", "tuned", "--previews", "taesd", "--preview-every", "1"),
        *("--preview-rounds", "1"),
    )
    assert report["benchmark"] == "engine" and report["device"] == "cpu"
    assert report["baseline_one_per_call_images_per_second"] > 0
    [run] = report["configs"]
    assert run["name"] == "tuned" and run["engine"]["channels_last"] is True
    assert run["images_per_second"] > 0 and run["ratio_to_baseline"] > 0
    assert sum(run["batches"]) == 3 and run["warm_up_seconds"] > 0
    assert 0 < run["lone_latency_p50_s"] <= run["lone_latency_p95_s"]
    previews = report["previews"]
    assert (previews["config"], previews["every"], previews["min_interval"], previews["rounds"]) == ("tuned", 1, 0.0, 1)
    off, taesd = previews["runs"]
    assert (off["decoder"], off["ratio_to_off"], taesd["decoder"]) == ("off", 1.0, "taesd")
    assert taesd["images_per_second"] > 0 and taesd["ratio_to_off"] > 0 and sum(taesd["batches"]) == 3
    profiled = report["profile"]
    assert profiled["config"] == "tuned" and profiled["images"] == 2 and profiled["denoise_s"] > 0
    assert profiled["top_ops"] and all(op["seconds"] >= 0 for op in profiled["top_ops"])


def test_cluster_benchmark_prints_json_for_each_worker_count() -> None:
    report = run_bench(
        "bench/cluster.py",
        *("--workers", "1,2", "--jobs", "16", "--batches", "10", "--batch-cost", "0.05", "--image-cost", "0.01"),
    )
    assert report["benchmark"] == "cluster"
    assert [row["workers"] for row in report["throughput"]] == [1, 2]
    for row in report["throughput"]:
        assert row["cluster_images_per_s"] > 0 and row["direct_images_per_s"] > 0
    assert report["throughput"][0]["speedup_over_one_worker"] == 1.0
    overhead = report["overhead"]
    assert overhead["batches"] == 10 and overhead["cluster_round_trip_ms_mean"] > 0


def test_arena_benchmark_prints_json_with_the_ratio_to_the_baseline() -> None:
    report = run_bench(
        "bench/arena.py",
        *("--requests", "30", "--users", "5", "--rate", "0.5", "--batch-cost", "0.02", "--image-cost", "0.005"),
    )
    assert report["benchmark"] == "arena"
    baseline, arena = report["baseline"], report["arena"]
    assert baseline["rate"] == 0 and baseline["pairs"] == 0 and baseline["images"] == baseline["requests"] == 30
    assert baseline["candidate_batches"] == 0
    # Each pair posts two images, both counted; the candidate worker rendered one of each.
    assert arena["rate"] == 0.5 and 0 < arena["pairs"] <= 30 and arena["images"] == 30 + arena["pairs"]
    assert arena["candidate_batches"] > 0
    for run in (baseline, arena):
        assert run["requests"] == 30 and run["images_per_s"] > 0 and run["requests_per_s"] > 0
        assert run["violations"] == []
    assert report["arena_to_baseline_images_per_s"] > 0

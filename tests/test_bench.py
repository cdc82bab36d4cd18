"""The benchmarks run and print the JSON they promise (their figures are read by people, not asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_admission_benchmark_prints_json() -> None:
    report = run_bench("bench/admission.py", "--requests", "200", "--users", "10")
    assert report["benchmark"] == "admission" and report["requests"] == 200
    assert 0 < report["accepted_per_pass"] <= 200 and report["refused_at_the_limit_per_pass"] == 200
    assert report["admissions_per_second"] > 0 and report["baseline_prompt_checks_per_second"] > 0

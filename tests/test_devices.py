"""The device layer on a machine without a GPU, and the GPU benchmark's CPU run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from drtune import devices

REPO = Path(__file__).resolve().parents[1]


def test_configure_names_the_cpu_and_lets_started_processes_grow_gpu_memory(monkeypatch) -> None:
    import tensorflow as tf

    monkeypatch.delenv(devices.GROWTH_ENV, raising=False)
    name = devices.configure()
    if tf.config.list_physical_devices("GPU"):  # pragma: no cover - GPU machines
        assert name != "cpu" and all(tf.config.experimental.get_memory_growth(g)
                                      for g in tf.config.list_physical_devices("GPU"))
    else:
        assert name == "cpu"
    # Worker processes started from here inherit it, so two can share one GPU.
    assert os.environ[devices.GROWTH_ENV] == "true"
    assert devices.configure() == name  # a second call in the same process is harmless


@pytest.mark.slow
def test_bench_gpu_runs_on_the_cpu_and_prints_its_last_line() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--size", "48",
                           "--batches", "2", "--steps", "1", "--repeats", "1", "--width", "4"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    # (float32, mixed) x (XLA off, on), each with its ratio to the baseline.
    rows = [line for line in lines if line.startswith("batch ")]
    assert len(rows) == 4 and "x1.00" in rows[0] and all("images/s" in r and "vs float32 without XLA" in r for r in rows)
    last = dict(kv.split("=", 1) for kv in lines[-1].split())
    assert set(last) == {"device", "float32_images_per_s", "mixed_images_per_s"}
    assert float(last["float32_images_per_s"]) > 0 and float(last["mixed_images_per_s"]) > 0
    if last["device"] == "cpu":
        assert "no GPU visible" in proc.stdout and "mixed = mixed_bfloat16" in proc.stdout

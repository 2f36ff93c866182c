"""On a GPU (marked gpu; skipped without one): ResNet-18 on cuda against the CPU, one copy of the
weights for 4 workers on one GPU, a SIGKILLed worker serving again from the keeper's copy, and
batched against unbatched ResNet-18 at 32 callers (reported, not gated). They share one run of
bench.gpu (its numbers printed and written to $OUT/gpu.json); scripts/device_check.sh runs them.

Here, on the CPU: the device script's dry run, bench.gpu --cpu-dry-run included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import REPO


def _has_cuda() -> bool:
    """Asked in a child: CUDA is not started in the test process (it forks nothing, but stays clean)."""
    if shutil.which("nvidia-smi") is None:
        return False
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=120)
    return done.stdout.strip() == "True"


needs_gpu = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (scripts/device_check.sh runs these on one)")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from bench import gpu

    out = Path(os.environ.get("OUT") or tmp_path_factory.mktemp("gpu"))
    return gpu.run(out, cpu_dry_run=False, callers=32, seconds=4.0, big_mib=2048)


@pytest.mark.gpu
@needs_gpu
def test_resnet18_on_cuda_matches_the_cpu(gpu_run: dict[str, Any]) -> None:
    correctness = gpu_run["correctness"]
    assert correctness["result_device"] == "cpu"  # results come back to the CPU for the wire
    assert correctness["allclose_1e-2"], correctness


@pytest.mark.gpu
@needs_gpu
def test_four_workers_on_one_gpu_hold_one_copy_of_the_weights(gpu_run: dict[str, Any]) -> None:
    memory = gpu_run["memory"]
    assert gpu_run["workers_gpu"] == [0, 0, 0, 0]
    if memory["delta_over_weights"] is None:
        pytest.skip("NVML is not available: the GPU's memory cannot be read")
    # One copy (the keeper's) and allocator slack; four copies would be 4x and more.
    assert memory["delta_over_weights"] < 1.5, memory


@pytest.mark.gpu
@needs_gpu
def test_a_killed_worker_serves_again_from_the_keepers_copy(gpu_run: dict[str, Any]) -> None:
    replacement = gpu_run["replacement"]
    assert replacement["replaced"] and replacement["answers_as_before"], replacement
    if replacement["gpu_used_delta_bytes"] is not None:
        # Its replacement's CUDA context, no copy of the weights.
        assert replacement["gpu_used_delta_bytes"] < gpu_run["memory"]["weights_bytes"] / 2, replacement


@pytest.mark.gpu
@needs_gpu
def test_batched_and_unbatched_resnet18_at_32_callers(gpu_run: dict[str, Any]) -> None:
    bench = gpu_run["bench"]
    assert bench["callers"] == 32
    assert all(row["calls_per_second"] > 0 for row in bench["median"].values())  # reported, never gated


# ---------------------------------------------------------------------------- here, on the CPU


@pytest.mark.timeout(400)  # the bench boots daemons and a keeper: slow on a busy 2-core host
def test_the_device_script_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "scripts/device_check.sh", "--cpu-dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 skipped" in (tmp_path / "pytest.txt").read_text()  # no GPU here: the gpu tests say so
    assert (tmp_path / "direct_scaling.txt").is_file()
    # The script's bench.gpu --cpu-dry-run: every step ran, on the CPU.
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["correctness"]["max_abs_difference"] < 1e-4 and results["correctness"]["result_device"] == "cpu"
    assert results["replacement"]["replaced"] and results["replacement"]["answers_as_before"]
    assert set(results["bench"]["median"]) == {"resnet", "resnet_batched"}
    printed = (tmp_path / "bench.txt").read_text()
    for number in ("1.", "2.", "3.", "4."):
        assert f"\n{number} " in f"\n{printed}", printed

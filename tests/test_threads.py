"""Torch's thread pool follows the container's CPU quota, read from real cgroup files (written here)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from jobs.common import threads


def _v2(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.max").write_text(text)
    return folder


def test_quota_is_read_from_cgroup_v2_and_v1(tmp_path: Path):
    assert threads.cfs_quota_cpus(_v2(tmp_path / "a", "150000 100000\n")) == 1.5
    assert threads.cfs_quota_cpus(_v2(tmp_path / "b", "max 100000\n")) is None
    v1 = tmp_path / "c" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cfs_quota_cpus(tmp_path / "c") == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cfs_quota_cpus(tmp_path / "c") is None
    assert threads.cfs_quota_cpus(tmp_path / "nothing-here") is None


def test_torch_threads_capped_at_the_quota_and_omp_setting_respected(tmp_path: Path, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(8)
        assert threads.configure(_v2(tmp_path, "100000 100000\n")) == 1  # a one-CPU container
        torch.set_num_threads(8)
        monkeypatch.setenv("OMP_NUM_THREADS", "8")
        assert threads.configure(_v2(tmp_path, "100000 100000\n")) == 8  # the user's explicit choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        visible = len(os.sched_getaffinity(0))
        assert threads.cpu_budget(_v2(tmp_path, "max 100000\n")) == visible
        assert threads.cpu_budget(_v2(tmp_path, f"{(visible + 4) * 100000} 100000\n")) == visible
    finally:
        torch.set_num_threads(before)

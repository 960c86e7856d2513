"""CPU threads for torch: as many as the job may actually use, not as many as the host has.

torch sizes its pool from the CPUs it can see. In a container limited by a CFS quota (Kubernetes CPU
limits, `docker --cpus`) it sees the whole host, and a pool larger than the quota makes every matmul
wait on throttled threads. OMP_NUM_THREADS, when set, is the user's choice and is left alone.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cfs_quota_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the CFS quota allows (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``); None if unlimited."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu/cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def cpu_budget(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cfs_quota_cpus(cgroup)
    return max(1, min(visible, math.ceil(quota) if quota else visible))


def configure(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cap torch's intra-op threads at the CPU budget; returns the thread count in effect."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    budget = cpu_budget(cgroup)
    if torch.get_num_threads() > budget:
        log.info("torch threads %d -> %d (the CPU quota of this container)", torch.get_num_threads(), budget)
        torch.set_num_threads(budget)
    return torch.get_num_threads()

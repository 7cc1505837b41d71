"""The whole machine's CPU time, from Linux's /proc/stat: one reading for every bench."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")


class CpuTicks(NamedTuple):
    """CPU ticks of every CPU since boot."""

    total: int  # the first 8 columns (guest time is already counted in user)
    idle: int  # idle + iowait
    steal: int  # taken by the hypervisor for other machines

    @property
    def busy(self) -> int:
        """Ticks not idle (steal included: the machine could not use them either)."""
        return self.total - self.idle


def cpu_ticks() -> CpuTicks:
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return CpuTicks(total=sum(ticks), idle=ticks[3] + ticks[4], steal=ticks[7])


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all CPUs)."""
    return cpu_ticks().busy / CLK_TCK

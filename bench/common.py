"""What every benchmark stage reports about its own process."""

from __future__ import annotations

import resource


def process_figures() -> dict[str, float]:
    """Peak resident memory of this process, in MiB."""
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def proc_figures(pid: int) -> dict[str, float]:
    """CPU seconds and peak RSS (MiB) of another running process, from /proc."""
    ticks = 100.0  # os.sysconf("SC_CLK_TCK") on Linux
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    peak = 0.0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return {"cpu_seconds": cpu, "peak_rss_mib": peak}

"""What every benchmark stage reports about its own process."""

from __future__ import annotations

CLOCK_TICKS = 100.0  # os.sysconf("SC_CLK_TCK") on Linux: the unit of /proc's CPU times


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process: the brokers and sink
    servers share the cores with the stage), from /proc/stat. Deltas over a stage, divided by its
    wall time, give the cores it kept busy: how close the machine itself was to its limit."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS  # user..steal; guest time is already in user


def proc_figures(pid: int) -> dict[str, float]:
    """CPU seconds and peak RSS (MiB) of another running process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    peak = 0.0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return {"cpu_seconds": cpu, "peak_rss_mib": peak}

"""cispo.phases.PhaseMonitor: a phase's peak memory is caught even when it is freed before the phase ends, and
a long phase says it is alive."""

import time

import torch

from cispo.phases import PhaseMonitor, rss_bytes


def test_a_freed_allocation_still_counts_in_the_phase_peak():
    lines = []
    monitor = PhaseMonitor(lines.append, heartbeat_s=0.2)
    base = rss_bytes()
    with monitor.phase("update", "step 1"):
        big = torch.ones(400 * 2**20 // 4)  # 400 MB, written so that it is resident
        time.sleep(0.5)
        del big
    with monitor.phase("sync", "step 1"):
        pass
    peaks = monitor.metrics()
    assert peaks["memory/update_peak_gb"] * 2**30 - base > 350 * 2**20, peaks
    assert peaks["memory/sync_peak_gb"] < peaks["memory/update_peak_gb"] - 0.3
    assert any(line.startswith("step 1 update: ") for line in lines), lines
    assert not any("sync" in line for line in lines)  # a short phase stays quiet
    assert monitor.metrics() == {}  # metrics() hands each step's peaks over once

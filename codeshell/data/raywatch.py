"""A watcher that takes a local Ray instance down with the driver that started it.

`ray.shutdown()` stops the instance when the driver exits or is signalled, but a driver
killed by SIGKILL (or the OOM killer) runs no code, and Ray's `DashboardAgent` and
`RuntimeEnvAgent` then outlive it and ignore SIGTERM. This process, started next to such a
driver, learns the driver's Ray processes (its descendants that belong to Ray: gcs_server,
raylet, the agents, workers) every second, and when the driver is gone (its pipe to us
closes: exit or death alike) it kills those still running. It never touches a process
that is not a Ray descendant of the driver, and it is not used for clusters the driver
only joined.

Run as `python -m codeshell.data.raywatch DRIVER_PID` with a pipe from the driver on stdin.
"""

from __future__ import annotations

import os
import select
import sys

import psutil


def _is_ray(p: psutil.Process) -> bool:
    try:
        name = p.name()
        if name.startswith("ray::") or name in ("raylet", "gcs_server"):
            return True
        return any("/ray/" in part for part in p.cmdline()[:3])
    except psutil.Error:
        return False


def ray_descendants(pid: int) -> dict[int, float]:
    """pid -> create_time of the Ray processes below `pid` (and below those, e.g. raylet's agents)."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    out = {}
    for k in kids:
        if _is_ray(k):
            try:
                out[k.pid] = k.create_time()
            except psutil.Error:
                pass
    return out


def reap(known: dict[int, float]) -> int:
    """SIGKILL the processes of `known` still running (same pid *and* start time) and their
    Ray children; returns how many were killed."""
    procs = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() != created:
                continue  # the pid was reused by an unrelated process
            procs.append(p)
            procs.extend(k for k in p.children(recursive=True) if _is_ray(k))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def main(driver: int) -> None:
    known: dict[int, float] = {}
    while True:
        known.update(ray_descendants(driver))
        ready, _, _ = select.select([sys.stdin], [], [], 1.0)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # the driver closed the pipe: it exited, was killed, or is done with Ray
        if not psutil.pid_exists(driver):
            break
    reap(known)


if __name__ == "__main__":
    main(int(sys.argv[1]))

"""Figure 5: start-up time, memory and idle cost of `keyrotor worker -p 1 -t 8`.

Start-up: from spawning the command until its worker process has sent its first heartbeat to the
broker (it consumes). RSS: the whole process tree (the supervising parent and its one worker
process) one second after ready, idle. Baseline: an interpreter that only imports the service's
main libraries, ``python -c 'import dramatiq, sqlmodel, hvac, redis'`` (spawn → exit; its RSS
after the imports). Idle: what the ready worker costs with nothing to do, over ``IDLE_S`` seconds:
its tree's CPU per second and the commands Redis served per second (``INFO stats``; nothing else
of the bench talks to Redis meanwhile). No baseline: an idle service should cost nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.bench import harness as h

#: Seconds the ready worker is watched idle.
IDLE_S = 5.0

IMPORTS = ("import dramatiq, sqlmodel, hvac, redis, pathlib; "
           "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS:')][0].split()[1])")


def run(stack: ExitStack, workdir: Path, vault: h.Vault, *, trials: int) -> dict[str, Any]:
    h.log(f"[5] worker start-up and RSS, {trials} trials")
    world = h.build_world(stack, workdir, vault, keys=1)
    start = h.Figure("start-up: spawn → consuming", "ms", baseline_label="python -c 'import dramatiq, sqlmodel, hvac, redis'")
    rss = h.Figure("RSS after ready (whole tree)", "MiB", baseline_label="same import-only interpreter")
    idle_cpu = h.Figure("idle worker: CPU per second", "ms/s")
    idle_redis = h.Figure("idle worker: Redis commands per second", "cmds/s")
    procs = []
    for _ in h.iter_trials(trials):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True, timeout=120)
        start.baseline.append((time.perf_counter() - t) * 1000)
        rss.baseline.append(int(out.stdout.strip()) / 1024)
        worker = world.start_worker(processes=1, threads=8, name="startup")
        start.measured.append(worker.ready_after_s * 1000)
        time.sleep(1.0)
        rss.measured.append(worker.rss_kib() / 1024)
        procs.append(len(h.tree_pids(worker.proc.pid)))
        cpu, commands = worker.cpu_s(), h.redis_commands_served()
        time.sleep(IDLE_S)
        idle_cpu.measured.append((worker.cpu_s() - cpu) * 1000 / IDLE_S)
        idle_redis.measured.append((h.redis_commands_served() - commands) / IDLE_S)
        worker.stop()
    rss.note = f"processes in the tree: {procs}"
    figures = [start, rss, idle_cpu, idle_redis]
    h.print_table("5. worker start-up, memory and idle cost", figures)
    return {"figures": {f.name: f.as_json() for f in figures}}

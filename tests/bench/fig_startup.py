"""Figure 5: start-up time and memory of `keyrotor worker -p 1 -t 8`.

Start-up: from spawning the command until its worker process has sent its first heartbeat to the
broker (it consumes). RSS: the whole process tree (the supervising parent and its one worker
process) one second after ready, idle. Baseline: an interpreter that only imports the service's
main libraries, ``python -c 'import dramatiq, sqlmodel, hvac, redis'`` (spawn → exit; its RSS
after the imports).
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.bench import harness as h

IMPORTS = ("import dramatiq, sqlmodel, hvac, redis, pathlib; "
           "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS:')][0].split()[1])")


def run(stack: ExitStack, workdir: Path, vault: h.Vault, *, trials: int) -> dict[str, Any]:
    h.log(f"[5] worker start-up and RSS, {trials} trials")
    world = h.build_world(stack, workdir, vault, keys=1)
    start = h.Figure("start-up: spawn → consuming", "ms", baseline_label="python -c 'import dramatiq, sqlmodel, hvac, redis'")
    rss = h.Figure("RSS after ready (whole tree)", "MiB", baseline_label="same import-only interpreter")
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
        worker.stop()
    rss.note = f"processes in the tree: {procs}"
    h.print_table("5. worker start-up and memory", [start, rss])
    return {"figures": {f.name: f.as_json() for f in (start, rss)}}

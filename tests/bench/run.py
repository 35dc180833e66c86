"""`make bench`: every figure of docs/performance.md, each against a baseline measured in the same run.

    python -m tests.bench.run            (what `make bench` runs)

Knobs (environment):
  KEYROTOR_BENCH_ONLY              figures to run, e.g. "1,2" (default: 1,2,3,4,5)
  KEYROTOR_BENCH_TRIALS            paired trials per figure (default 3)
  KEYROTOR_BENCH_KEYS              keys of figure 1 (default 300)
  KEYROTOR_BENCH_PROCESSES         worker processes of figure 1 (default 1)
  KEYROTOR_BENCH_EMERGENCY_KEYS    keys of figure 3 (default 300)
  KEYROTOR_BENCH_RATE_LIMIT        the provider's limit in figure 3, requests/s (default 20)
  KEYROTOR_BENCH_DETECTION_SIZES   inventory sizes of figure 4 (default 10000,100000,1000000)
  KEYROTOR_BENCH_OUT               the JSON report (default bench-results.json)
  KEYROTOR_BENCH_PROFILE=1         sample the worker processes' stacks; prints where their time goes
                                   (the figures of a profiled run are not comparable)
  KEYROTOR_BENCH_KEEP=1            keep the work directory (logs of the stand-ins and workers)
  KEYROTOR_TEST_PG_URL, KEYROTOR_TEST_REDIS_URL, VAULT_ADDR/VAULT_TOKEN: the services, as for `make test`
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from tests.bench import harness as h


def main() -> int:
    only = {s.strip() for s in os.environ.get("KEYROTOR_BENCH_ONLY", "1,2,3,4,5").split(",") if s.strip()}
    trials = h.env_int("KEYROTOR_BENCH_TRIALS", 3)
    out = Path(os.environ.get("KEYROTOR_BENCH_OUT", str(h.REPO / "bench-results.json")))
    report = h.Report(out, {"started_at": datetime.now(timezone.utc).isoformat(), "git": h.git_head(),
                            "machine": h.machine(), "trials": trials, "figures": {}})
    started = time.perf_counter()
    h.use_this_tree()
    with ExitStack() as stack:
        from worker.log import configure_logging

        devnull = stack.enter_context(open(os.devnull, "w"))
        configure_logging("WARNING", "json", stream=devnull)  # this process's own log lines are not the point
        work = h.workdir(stack)
        report.data["workdir"] = str(work)
        vault = h.start_vault(stack, work)
        if "1" in only:
            from tests.bench import fig_throughput

            with ExitStack() as fig:
                report.add("1_throughput", fig_throughput.run(fig, work, vault, keys=h.env_int("KEYROTOR_BENCH_KEYS", 300),
                                                              trials=trials, threads=h.env_int("KEYROTOR_BENCH_THREADS", 8),
                                                              processes=h.env_int("KEYROTOR_BENCH_PROCESSES", 1)))
        if "2" in only:
            from tests.bench import fig_latency

            with ExitStack() as fig:
                report.add("2_latency", fig_latency.run(fig, work, vault, trials=trials))
        if "3" in only:
            from tests.bench import fig_emergency

            with ExitStack() as fig:
                report.add("3_emergency", fig_emergency.run(fig, work, vault, keys=h.env_int("KEYROTOR_BENCH_EMERGENCY_KEYS", 300),
                                                            trials=trials, limit=h.env_int("KEYROTOR_BENCH_RATE_LIMIT", 20)))
        if "4" in only:
            from tests.bench import fig_detection

            sizes = [int(s) for s in os.environ.get("KEYROTOR_BENCH_DETECTION_SIZES", "10000,100000,1000000").split(",")]
            with ExitStack() as fig:
                report.add("4_detection", fig_detection.run(fig, work, sizes=sizes, trials=trials))
        if "5" in only:
            from tests.bench import fig_startup

            with ExitStack() as fig:
                report.add("5_startup", fig_startup.run(fig, work, vault, trials=trials))
        if os.environ.get("KEYROTOR_BENCH_PROFILE") == "1":
            report.data["profile"] = print_profile(work / "profile")
    report.data["runtime_s"] = round(time.perf_counter() - started, 1)
    report.data["machine"]["loadavg_end"] = os.getloadavg()
    report.write()
    m = report.data["machine"]
    print(f"\nmachine: {m['nproc']} cores, {m['cpu_model']}; load average at start {m['loadavg'][0]:.2f} "
          f"{m['loadavg'][1]:.2f} {m['loadavg'][2]:.2f}, at end {m['loadavg_end'][0]:.2f}; git {report.data['git']}; "
          f"{report.data['runtime_s']:.0f} s; JSON: {out}")
    return 0


def print_profile(directory: Path) -> dict[str, object]:
    """Merge the CPU samples of every profiled worker process; CPU by package and the 25 functions
    with the most CPU on their stack."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for path in directory.glob("profile-*.json"):
        data = json.loads(path.read_text())
        total += data["cpu_ns"]
        inclusive.update(dict(data["inclusive"]))
        own.update(dict(data["self"]))
    if not total:
        print("\nprofile: no samples")
        return {}
    packages: Counter[str] = Counter()
    for name, n in own.items():
        packages[_package(name)] += n
    print(f"\n=== profile of the worker processes: {total / 1e9:.1f} s of CPU sampled ===")
    print("CPU by package (self): " + ", ".join(f"{p} {n / total:.0%}" for p, n in packages.most_common(14)))
    print("functions with the most CPU on their stack (inclusive):")
    for name, n in inclusive.most_common(25):
        print(f"  {n / total:6.1%}  {_short(name)}")
    return {"cpu_s": total / 1e9, "packages": {p: n / total for p, n in packages.items()},
            "inclusive": [(k, n / total) for k, n in inclusive.most_common(60)]}


def _package(name: str) -> str:
    path = name.rsplit(":", 1)[0]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    for local in ("worker", "jobs", "keyrotor_sandbox"):
        if f"/{local}/" in path:
            return local + "/" + path.split(f"/{local}/", 1)[1].split("/", 1)[0].removesuffix(".py")
    return "stdlib:" + Path(path).stem


def _short(name: str) -> str:
    path, func = name.rsplit(":", 1)
    for marker in ("site-packages/", f"{h.REPO}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{func}"


if __name__ == "__main__":
    sys.exit(main())

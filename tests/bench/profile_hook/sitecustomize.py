"""KEYROTOR_BENCH_PROFILE=1: a CPU-weighted sampling profiler in every process of a benchmarked worker.

`make bench` puts this directory on the worker's PYTHONPATH, so Python imports this module at
start-up in the supervising process and in each spawned worker process. A daemon thread looks at
every thread every 5 ms: the CPU time the thread used since the last look (from
/proc/self/task/<tid>/schedstat, in ns) is charged to the stack it is on now. A thread blocked on
a socket, a lock or a sleep uses no CPU and is charged nothing, so the result is where the CPU
goes, not where the threads wait. Counted per function: CPU with it on the stack (inclusive) and
at the top (self). ``$KEYROTOR_BENCH_PROFILE_DIR/profile-<pid>.json`` is rewritten every 2 s
(spawned processes leave with ``os._exit``: an atexit hook would not run).
"""

import os

if os.environ.get("KEYROTOR_BENCH_PROFILE_DIR"):
    import json
    import sys
    import threading
    import time
    from collections import Counter

    def _cpu_ns(native_id: int) -> int:
        try:
            with open(f"/proc/self/task/{native_id}/schedstat") as fh:
                return int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def _run(out_dir: str) -> None:
        me = threading.get_ident()
        inclusive: Counter = Counter()
        own: Counter = Counter()
        last_cpu: dict = {}
        total = 0
        last_dump = time.monotonic()
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"profile-{os.getpid()}.json")
        while True:
            time.sleep(0.005)
            frames = sys._current_frames()
            for thread in threading.enumerate():
                ident, native = thread.ident, thread.native_id
                if ident == me or ident is None or native is None or ident not in frames:
                    continue
                cpu = _cpu_ns(native)
                used = cpu - last_cpu.get(native, cpu)
                last_cpu[native] = cpu
                if used <= 0:
                    continue
                total += used
                frame = frames[ident]
                own[f"{frame.f_code.co_filename}:{frame.f_code.co_name}"] += used
                seen = set()
                while frame is not None:
                    name = f"{frame.f_code.co_filename}:{frame.f_code.co_name}"
                    if name not in seen:
                        seen.add(name)
                        inclusive[name] += used
                    frame = frame.f_back
            if time.monotonic() - last_dump > 2:
                last_dump = time.monotonic()
                data = {"pid": os.getpid(), "argv": sys.argv, "cpu_ns": total,
                        "inclusive": inclusive.most_common(400), "self": own.most_common(400)}
                with open(path + ".tmp", "w") as fh:
                    json.dump(data, fh)
                os.replace(path + ".tmp", path)

    threading.Thread(target=_run, args=(os.environ["KEYROTOR_BENCH_PROFILE_DIR"],), name="bench-profiler",
                     daemon=True).start()

"""KEYROTOR_BENCH_PROFILE=1: a sampling profiler in every process of a benchmarked worker.

`make bench` puts this directory on the worker's PYTHONPATH, so Python imports this module at
start-up in the supervising process and in each spawned worker process. A daemon thread samples
every thread's stack every 5 ms and rewrites ``$KEYROTOR_BENCH_PROFILE_DIR/profile-<pid>.json``
every 2 s (spawned processes leave with ``os._exit``: an atexit hook would not run). Counted:
per function, samples where it is on the stack (inclusive) and at the top (self). Samples of
threads waiting (a lock, a queue, a socket poll, a sleep) are counted apart as idle.
"""

import os

if os.environ.get("KEYROTOR_BENCH_PROFILE_DIR"):
    import json
    import sys
    import threading
    import time
    from collections import Counter

    _IDLE = {("threading.py", "wait"), ("queue.py", "get"), ("selectors.py", "select"), ("socket.py", "readinto"),
             ("threading.py", "_wait_for_tstate_lock"), ("connection.py", "wait"), ("popen_fork.py", "poll")}

    def _run(out_dir: str) -> None:
        me = threading.get_ident()
        inclusive: Counter = Counter()
        own: Counter = Counter()
        busy = idle = 0
        last = time.monotonic()
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"profile-{os.getpid()}.json")
        while True:
            time.sleep(0.005)
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                code = frame.f_code
                leaf = (os.path.basename(code.co_filename), code.co_name)
                if leaf in _IDLE or code.co_name in ("sleep", "select", "poll", "recv_into", "accept"):
                    idle += 1
                    continue
                busy += 1
                own[f"{code.co_filename}:{code.co_name}"] += 1
                seen = set()
                f = frame
                while f is not None:
                    name = f"{f.f_code.co_filename}:{f.f_code.co_name}"
                    if name not in seen:
                        seen.add(name)
                        inclusive[name] += 1
                    f = f.f_back
            if time.monotonic() - last > 2:
                last = time.monotonic()
                data = {"pid": os.getpid(), "argv": sys.argv, "busy": busy, "idle": idle,
                        "inclusive": inclusive.most_common(400), "self": own.most_common(400)}
                with open(path + ".tmp", "w") as fh:
                    json.dump(data, fh)
                os.replace(path + ".tmp", path)

    threading.Thread(target=_run, args=(os.environ["KEYROTOR_BENCH_PROFILE_DIR"],), name="bench-profiler",
                     daemon=True).start()

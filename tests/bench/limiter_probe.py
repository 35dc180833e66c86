"""The rate limiter alone at a provider's limit: how much of the limit it spends, and the 429s.

    .venv/bin/python -m tests.bench.limiter_probe [--processes 2] [--threads 8] [--requests 600] [--limit 20]

The provider stand-in (a true sliding window, 429 with Retry-After beyond it) runs in this process;
``--processes`` spawned processes (workers), each with its own ``RedisRateLimiter`` on one Redis
namespace and ``--threads`` threads, send ``check`` calls through the generic HTTP provider as fast
as the limiter lets them; the admin token is read through a resolver that takes ``--resolve-ms``
(a Vault read). It isolates the limiter from the pipeline's own CPU cost, which on a loaded
machine caps what an emergency reaches before the limit does.

Figures: the sustained rate — the requests after the first window's free burst, over the time from
the first request to the last, as a share of the limit (a lossless limiter paces request k+limit
one period after request k ended, so 100 % is unreachable by the requests' own latency) — and the
429 answers. ``probe()`` returns them as a dict (the bench harness may call it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

REDIS_URL = os.environ.get("KEYROTOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ADMIN_TOKEN = "sbx-admin-limiter-probe"


def _client(url: str, namespace: str, threads: int, count: int, limit: int, resolve_ms: float,
            out: Any) -> None:
    from keyrotor_sandbox.provider import standin_provider_spec
    from worker.inventory.schema import HttpProviderSpec
    from worker.providers.http import HttpProvider
    from worker.providers.ratelimit import RedisRateLimiter
    from worker.log import configure_logging
    from worker.secret import Secret

    configure_logging("WARNING", "json", stream=open(os.devnull, "w"))  # a line per request is not the point

    def resolve(_ref: Any) -> Secret:
        time.sleep(resolve_ms / 1000)
        return Secret(ADMIN_TOKEN)

    spec = HttpProviderSpec.model_validate(standin_provider_spec(
        url, admin_token_ref={"vault": "kv/admin#token"}, rate_limit={"requests": limit, "per": "1s"}))
    provider = HttpProvider("probe", spec, resolve=resolve, attempts=1,
                            limiter=RedisRateLimiter.from_url(REDIS_URL, namespace=namespace, max_wait=120.0))
    seed = provider.issue(name="probe-seed", credential_type="api_key", labels={})  # a live key to check

    def work(n: int) -> list[float]:
        started = []
        for _ in range(count // threads):
            started.append(time.time())
            try:
                provider.check(seed.secret, credential_type="api_key")
            except Exception:
                pass  # counted at the stand-in
        return started

    with ThreadPoolExecutor(threads) as pool:
        out.put([t for times in pool.map(work, range(threads)) for t in times])


def probe(*, processes: int = 2, threads: int = 8, requests: int = 600, limit: int = 20, resolve_ms: float = 5.0) -> dict[str, Any]:
    from keyrotor_sandbox.provider import start_provider_in_thread
    from worker.redis_conn import redis_client

    provider = start_provider_in_thread(admin_token=ADMIN_TOKEN, rate_limit=(limit, 1.0))
    namespace = f"krprobe-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    try:
        children = [ctx.Process(target=_client, args=(provider.url, namespace, threads, requests // processes, limit,
                                                      resolve_ms, out)) for _ in range(processes)]
        for child in children:
            child.start()
        starts = sorted(t for _ in children for t in out.get(timeout=600))
        for child in children:
            child.join(60)
        stats = provider.stats()["routes"]
    finally:
        provider.stop()
        client = redis_client(REDIS_URL, socket_timeout=10)
        for key in client.scan_iter(match=f"{namespace}*"):
            client.delete(key)
    checks = stats.get("check", {})
    paced = len(starts) - limit
    rate = paced / (starts[-1] - starts[0]) if len(starts) > limit and starts[-1] > starts[0] else 0.0
    return {"processes": processes, "threads": threads, "limit_per_s": limit, "requests": len(starts),
            "answered": checks.get("200", 0), "429": checks.get("429", 0) + stats.get("issue", {}).get("429", 0),
            "sustained_per_s": round(rate, 2), "share_of_limit_pct": round(rate / limit * 100, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--resolve-ms", type=float, default=5.0)
    parser.add_argument("--trials", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.trials):
        print(json.dumps(probe(processes=args.processes, threads=args.threads, requests=args.requests,
                               limit=args.limit, resolve_ms=args.resolve_ms)), flush=True)


if __name__ == "__main__":
    main()

"""The floor: a rotation reduced to its essential HTTP calls, made directly with httpx.

The same provider stand-in and the same OpenBao as the worker; no database, no queue, no retries,
no audit trail. Eight calls per rotation (``ESSENTIAL_CALLS``):

provider  1. issue the new key                    POST   /api/api-key
vault     2. stage it (durable before anything)   POST   /v1/<mount>/data/keyrotor/staging/<run>
provider  3. verify the new key authenticates     GET    /api/user/me (Bearer new key)
vault     4. promote: write the key's path        POST   /v1/<mount>/data/<path>  (check-and-set)
vault     5. propagate: write the vault_copy      POST   /v1/<mount>/data/copies/<slug>
vault     6. verify the copy reads back           GET    /v1/<mount>/data/copies/<slug>
provider  7. revoke the old key                   DELETE /api/api-key/<old id>
vault     8. drop the staged copy                 DELETE /v1/<mount>/metadata/keyrotor/staging/<run>

Each rotation knows its key's current id and Vault version from the previous one (the worker reads
them from its database), so there is no read-before-write.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

ESSENTIAL_CALLS = 8


@dataclass
class FloorKey:
    index: int
    key_id: str
    version: int


class Floor:
    """Rotates the bench keys of a ``World`` by the essential calls; keeps each key's current id
    and Vault version so that it can rotate the same keys again in the next trial."""

    def __init__(self, world: Any) -> None:
        self.world = world
        self.local = threading.local()
        self.keys: dict[int, FloorKey] = {}

    def _clients(self) -> tuple[httpx.Client, httpx.Client]:
        clients = getattr(self.local, "clients", None)
        if clients is None:
            w = self.world
            provider = httpx.Client(base_url=w.provider.url, headers={"Authorization": f"Bearer {w.provider.admin_token}"},
                                    timeout=30)
            vault = httpx.Client(base_url=w.vault.addr, headers={"X-Vault-Token": w.vault.token}, timeout=30)
            clients = self.local.clients = (provider, vault)
        return clients

    def prepare(self, count: int) -> None:
        """Floor keys of their own (not the worker's): seeded at the provider and in Vault."""
        w = self.world
        seeded = w.provider.seed([f"floor-{i}" for i in range(count)])
        _, vault = self._clients()
        for i, key in enumerate(seeded):
            answer = vault.post(f"/v1/{w.mount}/data/floor/{i:05d}", json={"data": {"api_key": key["apiKey"]}})
            answer.raise_for_status()
            self.keys[i] = FloorKey(index=i, key_id=key["id"], version=answer.json()["data"]["version"])

    def rotate(self, index: int) -> None:
        provider, vault = self._clients()
        w, key = self.world, self.keys[index]
        run = uuid.uuid4().hex[:12]
        issued = provider.post("/api/api-key", json={"name": f"floor-{index}-{run}", "credentialType": "api_key"})
        issued.raise_for_status()
        new = issued.json()
        staging = f"/v1/{w.mount}/data/keyrotor/staging/floor-{run}"
        vault.post(staging, json={"data": {"api_key": new["apiKey"], "key_id": new["id"]}}).raise_for_status()
        check = provider.get("/api/user/me", headers={"Authorization": f"Bearer {new['apiKey']}"})
        check.raise_for_status()
        promoted = vault.post(f"/v1/{w.mount}/data/floor/{index:05d}",
                              json={"data": {"api_key": new["apiKey"], "key_id": new["id"]}, "options": {"cas": key.version}})
        promoted.raise_for_status()
        copy = f"/v1/{w.mount}/data/copies/floor-{index:05d}"
        vault.post(copy, json={"data": {"token": new["apiKey"]}}).raise_for_status()
        read = vault.get(copy)
        read.raise_for_status()
        assert read.json()["data"]["data"]["token"] == new["apiKey"]
        provider.delete(f"/api/api-key/{key.key_id}").raise_for_status()
        vault.delete(f"/v1/{w.mount}/metadata/keyrotor/staging/floor-{run}").raise_for_status()
        self.keys[index] = FloorKey(index=index, key_id=new["id"], version=promoted.json()["data"]["version"])

    def run_pool(self, threads: int) -> float:
        """Every floor key rotated once by a pool of ``threads``; wall seconds."""
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(self.rotate, sorted(self.keys)))
        return time.perf_counter() - started

    def close(self) -> None:
        pass  # thread-local clients go with their threads

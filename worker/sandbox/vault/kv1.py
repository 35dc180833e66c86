"""The KV version 1 secrets engine: one unversioned value per path."""

from __future__ import annotations

import copy
from typing import Any

from .errors import bad_request, not_found, unsupported_operation, unsupported_path
from .request import CREATE, DELETE, LIST, READ, UPDATE, Request, Result


class KvV1Engine:
    mount_type = "kv"

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}

    def existence(self, subpath: str) -> bool | None:
        return subpath in self.values

    def handle(self, req: Request, subpath: str) -> Result:
        op = req.operation
        if op == LIST:
            prefix = subpath if not subpath or subpath.endswith("/") else subpath + "/"
            keys = {k[len(prefix):].partition("/")[0] + k[len(prefix):].partition("/")[1] for k in self.values if k.startswith(prefix)}
            if not keys:
                raise not_found()
            return Result(data={"keys": sorted(keys)})
        if not subpath:
            raise unsupported_path()
        if op == READ:
            if subpath not in self.values:
                raise not_found()
            return Result(data=copy.deepcopy(self.values[subpath]))
        if op in (CREATE, UPDATE):
            if not req.body:
                raise bad_request("missing data fields")
            self.values[subpath] = copy.deepcopy(req.body)
            return Result()
        if op == DELETE:
            self.values.pop(subpath, None)
            return Result()
        raise unsupported_operation()

"""Up to promotion: ``precheck`` polls the provider until the new key is live, ``promote`` writes
it as the newest Vault version (check-and-set)."""

from __future__ import annotations

from typing import Any, Optional

from worker.clock import utcnow
from worker.db.models import VersionStage
from worker.errors import PermanentError
from worker.pipeline.context import PipelineContext
from worker.pipeline.effects import holding, parse_seconds, seconds_between
from worker.pipeline.row_writes import RowChange
from worker.pipeline.steps.common import Snapshot, StepOutcome, advance_run, require_staged, load_snapshot
from worker.pipeline.steps.provider import check_credential, deprecated_error, provider_for
from worker.protocol import Mode, RunState, Step

S = RunState


def _activation(ctx: PipelineContext, snap: Snapshot) -> tuple[float, float]:
    record = snap.provider_record  # read in this step's snapshot
    spec = (record.spec or {}).get("activation") or {} if record is not None else {}
    return (parse_seconds(spec.get("poll_interval"), ctx.policy.activation_poll_s),
            parse_seconds(spec.get("timeout"), ctx.policy.activation_timeout_s))


def precheck(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """issued → prechecked: poll the provider with the new key until it is live or the deadline."""
    snap = load_snapshot(ctx, run_id, Step.precheck)
    if snap is None:
        return None
    secret, _ = require_staged(ctx, snap, "check")
    provider = provider_for(ctx, snap)
    with holding(secret):
        outcome = check_credential(provider, secret, snap.credential_type)
    if outcome == "valid":
        return advance_run(ctx, snap, S.prechecked, detail={"fingerprint": secret.fingerprint})
    if outcome == "deprecated":  # waiting will not make a deprecated type acceptable
        raise deprecated_error(ctx, snap, "precheck")
    poll_s, timeout_s = _activation(ctx, snap)
    elapsed = seconds_between(utcnow(), snap.new.issued_at if snap.new else snap.run.updated_at)
    if elapsed < timeout_s:
        return StepOutcome(state=S.issued, mode=snap.mode, again_in_s=poll_s)
    raise PermanentError(f"the new credential is still {outcome} at the provider {elapsed:.0f}s after it was "
                         f"issued (activation timeout {timeout_s:.0f}s)")


def promote(ctx: PipelineContext, run_id: str) -> Optional[StepOutcome]:
    """prechecked → promoted: write the new secret as the newest Vault version (check-and-set)."""
    snap = load_snapshot(ctx, run_id, Step.promote)
    if snap is None:
        return None
    secret, key_id = require_staged(ctx, snap, "promote")
    key = snap.key
    expected = snap.old.vault_version if snap.old is not None else None
    with holding(secret):
        # Check-and-set on the old version; an attempt that promoted and crashed before recording
        # it makes the check fail, and ``promote`` then finds this very secret as the newest version.
        version = ctx.vault.promote(key.vault_mount, key.vault_path, key.vault_field, secret, key_id, expected)
    now = utcnow()
    assert snap.new is not None  # require_staged checked its fingerprint
    changes = [RowChange(snap.new, {"stage": VersionStage.current, "vault_version": version, "promoted_at": now})]
    if snap.old is not None:
        if snap.mode == Mode.cutover:
            changes.append(RowChange(snap.old, {"stage": VersionStage.retired, "retired_at": now}))
        else:
            changes.append(RowChange(snap.old, {"stage": VersionStage.previous}))

    detail: dict[str, Any] = {"vault_version": version, "fingerprint": secret.fingerprint}
    if snap.mode == Mode.cutover and snap.new is not None:
        detail["cutover_window_ms"] = int(seconds_between(now, snap.new.issued_at) * 1000)
    return advance_run(ctx, snap, S.promoted, detail=detail, changes=changes)

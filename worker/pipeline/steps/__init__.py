"""The effects of each protocol step. One function per step, each idempotent:

1. load a snapshot of the run; if it is not in the state this step acts on → skip (a duplicate or
   late message is harmless);
2. do the effect so that doing it twice changes nothing (look before issuing, compare
   fingerprints before writing Vault, skip sinks already pushed …);
3. move the run on with a conditional UPDATE (``runs.transition``), with its audit event and the
   version bookkeeping in the same transaction.

A step returns a ``StepOutcome`` (the state it reached, or "run me again in N seconds") and
raises ``TransientError``/``PermanentError`` on failure; ``execute`` turns failures into retries or
into the protocol's failure path. Secrets are read from Vault into memory only for the duration
of a step (``holding``); only fingerprints and provider key ids are written anywhere else.

Modules: ``common`` (snapshot, outcome, transition, notifications), ``provider`` (counted provider
calls), ``versions`` (version bookkeeping), ``issuing`` (issue, request_deposit), ``promotion``
(precheck, promote), ``sinks`` (propagate, verify, sink delivery), ``retirement`` (retire, finish),
``recovery`` (compensate, rollback, fail_run), ``dispatch`` (execute and the step table).
"""

# The dispatcher is the package's API (the actors, the in-thread driver and the tests call it);
# everything else is imported from the module that owns it.
from worker.pipeline.steps.dispatch import Action, execute
from worker.pipeline.steps.recovery import fail_run

__all__ = ["Action", "execute", "fail_run"]

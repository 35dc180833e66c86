"""The service layer's jobs: what starts, repairs and finishes rotation runs outside a step.

Due times, detection, reconciliation, retirement after grace, reminders, the plan, deposits,
deprecation and emergencies. The scheduler process (``jobs/``), the CLI and the actors call these;
they call down into ``worker.pipeline`` (requests, runs, the outbox), the adapters and the protocol.
"""

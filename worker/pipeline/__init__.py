"""The rotation pipeline: the steps, their context, step effects, rotation requests.

Entry points for other modules: ``requests.request_rotation``, ``outbox.enqueue_run``,
``deposit.deposit`` and ``context.configure`` (the one thing a process installs: its
``PipelineContext``). The Dramatiq broker, actors and worker processes are in ``worker/runtime/``.
"""

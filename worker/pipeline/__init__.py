"""The Dramatiq pipeline: broker, one actor per protocol step, step effects, rotation requests.

Entry points for other modules: ``requests.request_rotation``/``enqueue_run``,
``deposit.deposit``, ``broker.setup_broker``, ``workers.run_worker``/``start_worker``,
``context.configure``.
"""

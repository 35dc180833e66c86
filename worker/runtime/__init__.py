"""Entry points on the queue: the Dramatiq broker set-up, one actor per protocol step and the
request actor, worker processes and threads, the Redis Stream consumer, and the in-thread driver
the tests and benchmarks use. Everything here calls down into the service layer
(``worker.pipeline``, ``worker.service``); nothing below imports it.
"""

"""Stand-ins and the demo, outside the runtime package.

Local stand-ins used by the demo and the test-suite: a provider and a consumer (loopback only,
state in memory), a Kubernetes API server, and ``openbao``, which starts a real OpenBao dev server
in place of Vault; ``demo`` is what ``keyrotor demo`` runs. Production code (``worker/``,
``jobs/``) never imports this package except the ``demo`` and ``sandbox`` commands, lazily; the
image does not ship it (it copies only ``worker/`` and ``jobs/``).
"""

"""Local stand-ins used by the demo and the test-suite: a Vault HTTP API (``vault/``), a provider
and a consumer. They listen on loopback only and keep their state in memory."""

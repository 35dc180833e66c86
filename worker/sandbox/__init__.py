"""Local stand-ins used by the demo and the test-suite: a provider and a consumer (loopback only,
state in memory), and ``openbao``, which starts a real OpenBao dev server in place of Vault."""

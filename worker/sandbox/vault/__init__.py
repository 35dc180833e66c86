"""A stand-in for HashiCorp Vault's HTTP API (KV v2/v1, mounts, tokens, ACL policies, health,
Kubernetes auth), faithful enough that hvac's own KV v2 integration tests pass against it.

Layout: ``server`` (HTTP glue, ``start_in_thread``/``run_forever``), ``app`` (routing, auth, ACL
enforcement, envelopes), ``kv2``/``kv1`` (secrets engines), ``mounts``, ``tokens``, ``acl``
(HCL policies and their evaluation), ``policies`` (policy store), ``k8s_auth``, ``errors``,
``timeutil`` (Go durations, RFC 3339 times).
"""

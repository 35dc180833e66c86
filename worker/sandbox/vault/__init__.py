"""A stand-in for HashiCorp Vault's HTTP API, faithful enough that hvac's own KV v2 integration
tests pass against it unchanged. Behaviour that differs from real Vault is a bug.

Served (all under ``/v1/``, token in ``X-Vault-Token``, Vault's envelope and error bodies):
- KV v2 on any kv-v2 mount (``secret/`` at start): ``data/`` GET/POST/PUT/PATCH/DELETE,
  ``metadata/`` GET/POST/PATCH/LIST/DELETE, ``delete/``, ``undelete/``, ``destroy/``, ``subkeys/``,
  ``config``; KV v1 on v1 mounts.
- ``sys/health``, ``sys/seal-status``, ``sys/seal``, ``sys/unseal``, ``sys/init``, ``sys/leader``,
  ``sys/mounts`` (+ ``/{path}``, ``/{path}/tune``), ``sys/auth`` (+ ``/{path}``),
  ``sys/policies/acl`` and legacy ``sys/policy``, ``sys/capabilities-self``, ``sys/capabilities``.
- ``auth/token/`` create, create-orphan, lookup-self, lookup, renew-self, renew, revoke-self,
  revoke, revoke-orphan; ``auth/<kubernetes mount>/`` config, role, login.

Layout: ``server`` (HTTP glue, ``start_in_thread``/``run_forever``), ``app`` (routing, auth, ACL
enforcement, envelopes), ``system`` (sys/ and auth/token/), ``kv2``/``kv1`` (secrets engines),
``mounts``, ``tokens``, ``acl`` (HCL policies and their evaluation), ``policies`` (policy
store), ``k8s_auth``, ``errors``, ``timeutil`` (Go durations, RFC 3339 times), ``request``.

Known differences: Kubernetes logins are verified with ``pem_keys`` only (no TokenReview call);
no audit devices, leases, response wrapping, identity, cubbyhole, batch tokens or templated
policies; the ``default`` policy holds only the paths the stand-in serves.
"""

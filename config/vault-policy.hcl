# keyrotor — least-privilege Vault ACL policy.
#
# Matches config/keyrotor.example.yaml: managed keys live on the KV v2 mount `secret` under
# `apps/`, issued keys wait under `secret/keyrotor/staging/` (KEYROTOR_VAULT_MOUNT /
# KEYROTOR_VAULT_STAGING_PREFIX), provider admin credentials and integration signing secrets
# under `secret/keyrotor/providers/` and `secret/keyrotor/integrations/`, and the `vault_copy`
# integration writes applications' copies on the `apps` mount. Adjust the mounts and prefixes
# to your inventory; keep the split between data/ and metadata/ (KV v2 ACLs name them).
#
#   vault policy write keyrotor config/vault-policy.hcl
#   vault write auth/kubernetes/role/keyrotor \
#       bound_service_account_names=keyrotor bound_service_account_namespaces=keyrotor \
#       policies=keyrotor ttl=1h max_ttl=24h
#
# What keyrotor never needs: `sudo`, `delete`/`destroy` on managed keys (old versions stay in
# KV history for rollback; retention is Vault's max_versions), `list` on the whole mount, and
# any sys/ path other than health.

# --- Managed keys --------------------------------------------------------------------------
# read: current and previous versions (rollback reads an old version).
# create: the first promotion of a new key (check-and-set 0).
# update: promotion / restore as a new version (check-and-set on the expected version).
path "secret/data/apps/*" {
  capabilities = ["create", "read", "update"]
}

# Versions listing, custom metadata (last rotation, run id) and the delete_version_after
# value that is read back so updating custom metadata does not reset it.
path "secret/metadata/apps/*" {
  capabilities = ["read", "create", "update"]
}

# --- Staging of issued keys ----------------------------------------------------------------
# An issued key is written here before promotion and removed with all its versions afterwards
# (DELETE on metadata = delete the key and destroy every version: needs `delete` there).
path "secret/data/keyrotor/staging/*" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/keyrotor/staging/*" {
  capabilities = ["read", "delete"]
}

# --- Owners' deposits (assisted mode) ---------------------------------------------------------
# A person writes a credential they created in a vendor's UI to secret/keyrotor/deposits/<key
# slug> (their policy: config/vault-owner-deposit-policy.hcl, write-only). keyrotor reads it,
# reads the version's creation time from the metadata, and destroys the deposit with every
# version (DELETE on metadata) once it was accepted or rejected (KEYROTOR_VAULT_DEPOSIT_PREFIX).
path "secret/data/keyrotor/deposits/*" {
  capabilities = ["read"]
}

path "secret/metadata/keyrotor/deposits/*" {
  capabilities = ["read", "delete"]
}

# --- Credentials keyrotor uses but never writes ----------------------------------------------
# Provider admin tokens (to issue/revoke keys) and integration signing secrets, referenced in
# the inventory as {vault: "secret/keyrotor/providers/<name>#<field>"}.
path "secret/data/keyrotor/providers/*" {
  capabilities = ["read"]
}

path "secret/data/keyrotor/integrations/*" {
  capabilities = ["read"]
}

# --- vault_copy integration ----------------------------------------------------------------
# Copies of rotated keys for applications that read their own mount (example: apps/billing/*).
path "apps/data/*" {
  capabilities = ["create", "read", "update"]
}

path "apps/metadata/*" {
  capabilities = ["read"]
}

# --- Token housekeeping ----------------------------------------------------------------------
# Already in Vault's `default` policy; repeated so the role still works with
# token_no_default_policy=true.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

# --- Health ----------------------------------------------------------------------------------
# sys/health is unauthenticated; nothing to grant.

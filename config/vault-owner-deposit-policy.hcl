# keyrotor — example Vault policy for the OWNER of a key rotated by a person (assisted mode).
#
# The owner creates the new credential in the vendor's UI and writes it to the key's deposit
# path. This policy may write there but never read it back (nor list, nor read metadata): a
# token holding it cannot see what anyone deposited, and it grants nothing else in Vault.
# keyrotor reads the deposit, checks it at the provider, records it, and destroys it (every
# version and its metadata) — see config/vault-policy.hcl for keyrotor's side.
#
# The path is <KEYROTOR_VAULT_MOUNT>/<KEYROTOR_VAULT_DEPOSIT_PREFIX>/<key slug>; the key slug is
# the key's name lower-cased with every run of other characters than a-z 0-9 _ . - replaced by
# "-" (key `asana/marketing-pat` → `asana-marketing-pat`). One policy per owner team, listing
# that team's keys:
#
#   sed 's/KEY_SLUG/asana-marketing-pat/' config/vault-owner-deposit-policy.hcl \
#     | vault policy write keyrotor-deposit-marketing -
#   # then attach it to the team's people (an identity group, or their auth method's role)
#
# What the owner then runs (the value comes from stdin, never the command line):
#
#   vault kv put -mount=secret keyrotor/deposits/asana-marketing-pat credential=- deposited_by=alice
#
# `deposited_by` is recorded in keyrotor's audit trail as the name the depositor *claims*; KV v2
# does not record which token wrote a version. What Vault does enforce is this policy: only its
# holders can write the path (Vault's audit device, if enabled, records the token of each write).

# create: the first deposit (keyrotor destroys the path after each pickup, so usually this one);
# update: a second write before keyrotor picked up the first. No read, list or delete.
path "secret/data/keyrotor/deposits/KEY_SLUG" {
  capabilities = ["create", "update"]
}

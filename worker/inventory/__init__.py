"""The inventory: what keyrotor rotates, declared in YAML (schema), loaded with error locations
(loader) and synced into the database (apply)."""

"""The inventory: what keyrotor rotates, declared in YAML (schema), loaded with error locations
(loader) and synced into the database (apply)."""

# The schema first: it imports oauth_schema (a provider kind) after defining the parts that module
# takes from it, so either module may be imported first.
from worker.inventory import schema as schema  # noqa: E402,F401

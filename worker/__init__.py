"""keyrotor: event-driven API-key rotation (issue, store in Vault, propagate, verify, retire)."""

__version__ = "0.1.0"

"""Integrations: how a new secret reaches its dependents (signed webhooks, Vault copies)."""

from worker.integrations.base import Announcement, Integration, VerifyResult, VerifyStatus

__all__ = ["Announcement", "Integration", "VerifyResult", "VerifyStatus"]

"""Scheduled jobs: detection, reconciliation, retirement, behind a Redis leader lock."""

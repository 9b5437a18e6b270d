"""Persistence: one ``Store`` protocol, two adapters (REST via supabase-py, direct Postgres)."""

from worker.store.base import ClaimedJob, Job, Store, StoreError

__all__ = ["ClaimedJob", "Job", "Store", "StoreError"]

"""Persistence: one ``Store`` over two transports (direct asyncpg, REST via supabase-py)."""

from worker.store.base import ClaimedJob, Job, StoreError
from worker.store.sqlapi import Store

__all__ = ["ClaimedJob", "Job", "Store", "StoreError"]

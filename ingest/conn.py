"""The warehouse connection type (a leaf: the warehouse and the integrity layers both take one).

It lives apart from ``ingest.warehouse.db`` so that code which only *receives* a connection
(the integrity chain, the verifier) does not depend on the module that makes them.
"""

from __future__ import annotations

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: A plain connection or one borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy

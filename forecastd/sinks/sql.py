"""SQL sink: upserts into two tables with SQLAlchemy 2 Core (SQLite and PostgreSQL).

Tables are created when missing, with the contract columns and a primary key on the contract key;
an existing table is checked column by column before the first write. Upserts use the dialect's
INSERT ... ON CONFLICT (key) DO UPDATE, and skip rows whose values are unchanged, so a replay rewrites
nothing. Both tables of one write() commit in one transaction: durable when it returns (PostgreSQL
commits are synchronous by default, SQLite's default journal syncs at commit).

Batching: rows go to the driver as executemany batches of BATCH_ROWS. Each row binds its own nine
parameters, so neither SQLite's limit on bound variables a statement (999 on old builds) nor
PostgreSQL's 65,535 is ever approached; the drivers then batch for us (psycopg 3 pipelines, sqlite3
loops in C). A multi-row VALUES statement sized to the parameter limit measured 8x slower here,
because SQLAlchemy compiles a new statement for every batch. The batch size only bounds memory.

Timestamps are timezone-aware DateTime columns (timestamptz on PostgreSQL). SQLite keeps no zone, so
values are stored as UTC text and read back as UTC.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from forecastd.errors import SinkError
from forecastd.sinks.schema import SPECS, TableName, TableSpec, conform, empty, spec_for
from forecastd.sources.mapping import utc_bound
from forecastd.sources.sql import SERIES_CHUNK, connect, db_reason, describe_url, make_engine

__all__ = ["SqlSink", "SUPPORTED_DIALECTS", "BATCH_ROWS"]

log = logging.getLogger(__name__)

SUPPORTED_DIALECTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
BATCH_ROWS = 10_000

_SQL_TYPES: dict[str, type[sa.types.TypeEngine] | sa.types.TypeEngine] = {
    "object": sa.Text(),
    "datetime64[ns, UTC]": sa.DateTime(timezone=True),
    "int64": sa.BigInteger(),
    "float64": sa.Float(precision=53),  # double precision
    "bool": sa.Boolean(),
}
# What an existing column's reflected type must be an instance of, per contract dtype.
_FAMILIES: dict[str, tuple[type, ...]] = {
    "object": (sa.String,),
    "datetime64[ns, UTC]": (sa.DateTime,),
    "int64": (sa.Integer,),
    "float64": (sa.Float, sa.Numeric),
    "bool": (sa.Boolean, sa.Integer),  # SQLite and some tools store booleans as integers
}


class SqlSink:
    """Writes and reads the output tables at `url`; see forecastd.sinks.Sink for the contract."""

    def __init__(
        self,
        url: str,
        *,
        db_schema: str | None = None,
        forecasts_table: str = "forecasts",
        anomalies_table: str = "anomalies",
        engine: sa.Engine | None = None,
    ) -> None:
        try:
            backend = (engine.url if engine is not None else sa.make_url(url)).get_backend_name()
        except sa.exc.ArgumentError:
            raise SinkError(
                f"[sink] url = {url!r} is not an SQLAlchemy URL; use e.g. \"sqlite:///out.db\" or "
                "\"postgresql+psycopg://user@host:5432/db\""
            ) from None
        if backend not in SUPPORTED_DIALECTS:
            raise SinkError(
                f"[sink] url uses the {backend!r} dialect, which has no upsert support in forecastd; use one of "
                f"{', '.join(sorted(SUPPORTED_DIALECTS))} (e.g. \"sqlite:///out.db\"), or write Parquet with "
                "[sink] kind = \"parquet\""
            )
        self.url = url
        self.engine = engine if engine is not None else make_engine(url, error=SinkError, section="sink")
        self.db_schema = db_schema
        self.names = {"forecasts": forecasts_table, "anomalies": anomalies_table}
        self._insert = SUPPORTED_DIALECTS[backend]
        self._tables: dict[str, sa.Table] = {}  # checked or created, by output name

    def __repr__(self) -> str:
        return f"SqlSink({describe_url(self.engine.url)!r})"

    def write(self, forecasts: pd.DataFrame, anomalies: pd.DataFrame) -> None:
        frames = {
            name: conform(frame, SPECS[name])
            for name, frame in (("forecasts", forecasts), ("anomalies", anomalies))
        }
        frames = {k: v for k, v in frames.items() if not v.empty}
        if not frames:
            return
        prepared: dict[str, sa.Table] = {}
        with self._transaction() as conn:
            for name, frame in frames.items():
                table = self._table(conn, SPECS[name], create=True)
                assert table is not None
                prepared[name] = table
                self._upsert(conn, SPECS[name], table, frame)
        # Remembered only after the commit: a rolled-back CREATE TABLE must be checked again next time.
        self._tables.update(prepared)
        log.debug("upserted %s", ", ".join(f"{len(f)} {k}" for k, f in frames.items()))

    def read(
        self,
        table: TableName,
        series: Sequence[str] | None = None,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        spec = spec_for(table)
        since, until = utc_bound(since, "since"), utc_bound(until, "until")
        with connect(self.engine, SinkError, "sink") as conn:
            t = self._table(conn, spec, create=False)
            if t is None:
                return empty(spec)
            self._tables[spec.name] = t
            stmt = sa.select(*(t.c[c] for c in spec.columns))
            time = t.c[spec.time]
            if since is not None:
                stmt = stmt.where(time > sa.bindparam("since", self._bind_time(since), type_=time.type))
            if until is not None:
                stmt = stmt.where(time <= sa.bindparam("until", self._bind_time(until), type_=time.type))
            if series is None:
                rows = self._execute(conn, spec, stmt)
            else:
                ids = [str(s) for s in series]
                rows = []
                for start in range(0, len(ids), SERIES_CHUNK):
                    chunk = ids[start:start + SERIES_CHUNK]
                    rows += self._execute(conn, spec, stmt.where(t.c.series_id.in_(chunk)))
        if not rows:
            return empty(spec)
        return conform(pd.DataFrame.from_records(rows, columns=list(spec.columns)), spec)

    # -- tables ------------------------------------------------------------------------------------

    def _qualified(self, spec: TableSpec) -> str:
        name = self.names[spec.name]
        return f"{self.db_schema}.{name}" if self.db_schema else name

    def _definition(self, spec: TableSpec) -> sa.Table:
        columns = [
            sa.Column(c, _SQL_TYPES[d], nullable=c not in spec.key and d != "object")
            for c, d in spec.columns.items()
        ]
        return sa.Table(
            self.names[spec.name], sa.MetaData(), *columns, sa.PrimaryKeyConstraint(*spec.key), schema=self.db_schema
        )

    def _table(self, conn: sa.Connection, spec: TableSpec, *, create: bool) -> sa.Table | None:
        """The output table, created (create=True) or None (create=False) when missing, checked when found."""
        if spec.name in self._tables:
            return self._tables[spec.name]
        table = self._definition(spec)
        inspector = sa.inspect(conn)
        try:
            exists = inspector.has_table(table.name, schema=self.db_schema)
            if not exists:
                if not create:
                    return None
                if self.db_schema and self.db_schema not in inspector.get_schema_names():
                    raise SinkError(
                        f"schema {self.db_schema!r} does not exist at {describe_url(self.engine.url)}; create it "
                        f"(CREATE SCHEMA ...) or remove [sink] db_schema"
                    )
                table.create(conn, checkfirst=True)
                log.info("created table %s", self._qualified(spec))
            else:
                self._check(inspector, spec, table)
        except sa.exc.SQLAlchemyError as exc:
            raise SinkError(f"cannot prepare table {self._qualified(spec)!r}: {db_reason(exc)}") from exc
        return table

    def _check(self, inspector: sa.Inspector, spec: TableSpec, table: sa.Table) -> None:
        """SinkError naming the first contract column an existing table lacks or types differently."""
        name = self._qualified(spec)
        key = f"{spec.name}_table"
        found = {c["name"]: c for c in inspector.get_columns(table.name, schema=self.db_schema)}
        for column, dtype in spec.columns.items():
            if column not in found:
                want = _SQL_TYPES[dtype].compile(dialect=self.engine.dialect)
                raise SinkError(
                    f"table {name!r} exists but has no column {column!r}; add it (ALTER TABLE ... ADD COLUMN "
                    f"{column} {want}) or set [sink] {key} to a new table name and forecastd creates it"
                )
        for column, dtype in spec.columns.items():
            have = found[column]["type"]
            # timestamp without time zone would store the session's wall time, not the instant.
            wrong_zone = (dtype.startswith("datetime64") and self.engine.dialect.name == "postgresql"
                          and not getattr(have, "timezone", False))
            if not isinstance(have, _FAMILIES[dtype]) or wrong_zone:
                want = _SQL_TYPES[dtype].compile(dialect=self.engine.dialect)
                raise SinkError(
                    f"column {column!r} of table {name!r} has type {have}, forecastd writes {want}; change it "
                    f"(ALTER TABLE ... ALTER COLUMN {column} TYPE {want}) or set [sink] {key} to a new table name"
                )
        where = {"table_name": table.name, "schema": self.db_schema}
        uniques = [inspector.get_pk_constraint(**where).get("constrained_columns") or []]
        uniques += [u["column_names"] for u in inspector.get_unique_constraints(**where)]
        uniques += [i["column_names"] for i in inspector.get_indexes(**where) if i.get("unique")]
        if not any(set(u) == set(spec.key) for u in uniques):
            raise SinkError(
                f"table {name!r} has no primary key or unique constraint on {', '.join(spec.key)}, which upserts "
                f"need; add one (CREATE UNIQUE INDEX ... ON ... ({', '.join(spec.key)})) or set [sink] {key} to a "
                "new table name"
            )

    # -- statements --------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        with connect(self.engine, SinkError, "sink") as conn:
            try:
                with conn.begin():
                    yield conn
            except sa.exc.SQLAlchemyError as exc:
                raise SinkError(
                    f"writing to {describe_url(self.engine.url)} failed and was rolled back: "
                    f"{db_reason(exc)}"
                ) from exc

    def _upsert(self, conn: sa.Connection, spec: TableSpec, table: sa.Table, frame: pd.DataFrame) -> None:
        insert = self._insert(table)
        stmt = insert.on_conflict_do_update(
            index_elements=[table.c[k] for k in spec.key],
            set_={c: insert.excluded[c] for c in spec.values},
            # A replayed row changes nothing: no new tuple, no WAL, no trigger.
            where=sa.or_(*(table.c[c].is_distinct_from(insert.excluded[c]) for c in spec.values)),
        )
        for start in range(0, len(frame), BATCH_ROWS):
            conn.execute(stmt, self._records(spec, frame.iloc[start:start + BATCH_ROWS]))

    def _records(self, spec: TableSpec, frame: pd.DataFrame) -> list[dict[str, Any]]:
        """Rows as plain Python values: NaN and NaT become NULL, timestamps UTC datetimes.

        The DBAPI takes one parameter set per row, so this is the one per-row step of a write; the
        columns are converted whole before it.
        """
        columns = []
        for name, dtype in spec.columns.items():
            col = frame[name]
            if dtype.startswith("datetime64"):
                values = self._bind_times(col)
            elif dtype == "float64":
                values = col.astype(object).where(col.notna(), None).tolist()
            else:
                values = col.tolist()
            columns.append(values)
        names = list(spec.columns)
        return [dict(zip(names, row)) for row in zip(*columns)]

    def _bind_time(self, t: pd.Timestamp) -> Any:
        return self._bind_times(pd.Series([t]))[0]

    def _bind_times(self, col: pd.Series) -> list[Any]:
        # Drivers carry microseconds (flooring keeps `ts > since` exact). SQLite's DateTime ignores the
        # zone, so it gets UTC wall time; PostgreSQL gets aware UTC values for timestamptz.
        col = col.dt.tz_convert("UTC").dt.floor("us")
        if self.engine.dialect.name == "sqlite":
            col = col.dt.tz_localize(None)
        return col.astype(object).where(col.notna(), None).tolist()

    def _execute(self, conn: sa.Connection, spec: TableSpec, stmt: sa.Select) -> list[Any]:
        try:
            return list(conn.execute(stmt).all())
        except sa.exc.SQLAlchemyError as exc:
            raise SinkError(f"reading table {self._qualified(spec)!r} failed: {db_reason(exc)}") from exc

"""SQL sink: upserts into two tables with SQLAlchemy 2 Core (SQLite and PostgreSQL).

Tables are created when missing, with the contract columns and a primary key on the contract key,
time first; an existing table is checked column by column before the first write. Upserts use the
dialect's INSERT ... ON CONFLICT (key) DO UPDATE, and skip rows whose values are unchanged, so a replay
rewrites nothing. Both tables of one write() commit in one transaction: durable when it returns (PostgreSQL
commits are synchronous by default, SQLite's default journal syncs at commit).

Bulk writes, because a tick of 10,000 series is 250,000 rows and SQLAlchemy's per-row parameter
handling (a dict per row, a Python bind processor per value) took 4 to 16 s for them:
- the columns are converted whole (numpy, pandas) into plain Python values;
- SQLite: an upsert of up to SQLITE_VARIABLES // columns rows in one VALUES list is compiled once and
  run with the driver's executemany (which loops in C) over those rows, in batches of BATCH_ROWS.
  Staging in a temp table first measured no faster, nor did one JSON parameter read by json_each;
- PostgreSQL: where the table holds nothing at or after the rows' first time (a tick's new rows), they
  are COPYed straight into it (psycopg 3 `cursor.copy`); other rows are COPYed into a temporary table,
  then one INSERT ... SELECT ... ON CONFLICT moves them into the output table. Row-at-a-time
  executemany, even pipelined, costs a statement's worth of server work per row. COPY takes the binary
  format, built by numpy (`pgbinary`): psycopg's write_row spent 8 us a row converting values in Python,
  and CSV (pyarrow) made the server parse every float and time as text.
Every statement that names a user's table is built by SQLAlchemy, which quotes identifiers; values are
always bound or copied, never formatted into SQL.

Timestamps are timezone-aware DateTime columns (timestamptz on PostgreSQL). SQLite keeps no zone, so
values are stored as UTC text and read back as UTC.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from forecastd.config import mask_password
from forecastd.errors import SinkError
from forecastd.sinks import pgbinary
from forecastd.sinks.schema import SPECS, TableName, TableSpec, conform, empty, spec_for
from forecastd.sources.mapping import utc_bound
from forecastd.sources.sql import SERIES_CHUNK, connect, db_reason, describe_url, make_engine

__all__ = ["SqlSink", "SUPPORTED_DIALECTS", "BATCH_ROWS", "SQLITE_VARIABLES"]

log = logging.getLogger(__name__)

SUPPORTED_DIALECTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
BATCH_ROWS = 10_000  # rows turned into Python tuples at a time: bounds memory on a large backfill
SQLITE_VARIABLES = 999  # parameters a SQLite statement takes in every build (newer ones: 32,766)

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
        lock_timeout: float = 0.0,
        engine: sa.Engine | None = None,
    ) -> None:
        try:
            backend = (engine.url if engine is not None else sa.make_url(url)).get_backend_name()
        except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
            raise SinkError(
                f"[sink] url = {mask_password(url)!r} is not an SQLAlchemy URL; use e.g. \"sqlite:///out.db\" or "
                "\"postgresql+psycopg://user@host:5432/db\""
            ) from None
        if backend not in SUPPORTED_DIALECTS:
            raise SinkError(
                f"[sink] url uses the {backend!r} dialect, which has no upsert support in forecastd; use one of "
                f"{', '.join(sorted(SUPPORTED_DIALECTS))} (e.g. \"sqlite:///out.db\"), or write Parquet with "
                "[sink] kind = \"parquet\""
            )
        self.url = url
        self.engine = engine if engine is not None else make_engine(url, error=SinkError, section="sink",
                                                                           lock_timeout=lock_timeout)
        self.db_schema = db_schema
        self.names = {"forecasts": forecasts_table, "anomalies": anomalies_table}
        self._insert = SUPPORTED_DIALECTS[backend]
        self._tables: dict[str, sa.Table] = {}  # checked or created, by output name
        self._compiled: dict[tuple[str, int], str] = {}  # SQLite upserts, by output name and rows
        self._time_led: dict[str, bool] = {}  # whether an index starts with the time column, by output name
        self._integer_flags: dict[str, list[str]] = {}  # flag columns an existing table stores as integers
        self._exact: dict[str, bool] = {}  # whether every column has the very type forecastd creates, by output name

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
        # Keyed time first (TableSpec.stored_key), so a tick's rows are appended. On SQLite without a
        # rowid: the key's B-tree is then the only one (240,000 rows a tick: 0.53-0.63 s against 0.66-0.80
        # s for a rowid table and its key index; series first, without a rowid was the slower of the two).
        return sa.Table(
            self.names[spec.name], sa.MetaData(), *columns, sa.PrimaryKeyConstraint(*spec.stored_key),
            schema=self.db_schema, sqlite_with_rowid=False,
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
                self._time_led[spec.name] = self._exact[spec.name] = True
            else:
                self._time_led[spec.name] = self._check(inspector, spec, table)
        except sa.exc.SQLAlchemyError as exc:
            raise SinkError(f"cannot prepare table {self._qualified(spec)!r}: {db_reason(exc, 'sink')}") from exc
        return table

    def _check(self, inspector: sa.Inspector, spec: TableSpec, table: sa.Table) -> bool:
        """SinkError naming the first contract column an existing table lacks or types differently; else
        whether an index starts with the time column."""
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
        indexes = inspector.get_indexes(**where)
        uniques = [inspector.get_pk_constraint(**where).get("constrained_columns") or []]
        uniques += [u["column_names"] for u in inspector.get_unique_constraints(**where)]
        uniques += [i["column_names"] for i in indexes if i.get("unique")]
        if not any(set(u) == set(spec.key) for u in uniques):
            raise SinkError(
                f"table {name!r} has no primary key or unique constraint on {', '.join(spec.key)}, which upserts "
                f"need; add one (CREATE UNIQUE INDEX ... ON ... ({', '.join(spec.key)})) or set [sink] {key} to a "
                "new table name"
            )
        leads = uniques + [i["column_names"] for i in indexes]
        self._exact[spec.name] = all(_exact(found[c]["type"], d) for c, d in spec.columns.items())
        self._integer_flags[spec.name] = [c for c, d in spec.columns.items()
                                          if d == "bool" and not isinstance(found[c]["type"], sa.Boolean)]
        return any(cols and cols[0] == spec.time for cols in leads)

    # -- statements --------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        # COPY goes through the driver's own cursor, so the driver's errors are caught too.
        driver_error = getattr(self.engine.dialect.dbapi, "Error", sa.exc.SQLAlchemyError)
        with connect(self.engine, SinkError, "sink") as conn:
            try:
                with conn.begin():
                    yield conn
            except (sa.exc.SQLAlchemyError, driver_error) as exc:
                raise SinkError(
                    f"writing to {describe_url(self.engine.url)} failed and was rolled back: "
                    f"{db_reason(exc, 'sink')}"
                ) from exc

    def _upsert(self, conn: sa.Connection, spec: TableSpec, table: sa.Table, frame: pd.DataFrame) -> None:
        frame = _in_stored_order(frame, spec)
        if self.engine.dialect.name == "postgresql":
            self._copy_upsert(conn, spec, table, frame)
            return
        # Many rows a statement: sqlite3's executemany costs a statement run per parameter set, and that,
        # not the binding or the B-tree, was half a write (240,000 rows: 0.6 s one row a run, 0.3 s 124).
        width = len(spec.columns)
        per = max(1, SQLITE_VARIABLES // width)
        for block in self._sqlite_rows(spec, frame, BATCH_ROWS - BATCH_ROWS % per or per):
            full = len(block) - len(block) % per
            if full:
                conn.exec_driver_sql(self._sqlite_upsert(conn, spec, table, per),
                                     list(map(tuple, block[:full].reshape(full // per, per * width).tolist())))
            if full < len(block):
                conn.exec_driver_sql(self._sqlite_upsert(conn, spec, table, len(block) - full),
                                     tuple(block[full:].ravel().tolist()))

    def _sqlite_upsert(self, conn: sa.Connection, spec: TableSpec, table: sa.Table, n: int) -> str:
        """The upsert of `n` rows in one VALUES list, compiled once per size; it takes the rows' values
        flat, row by row, each in the contract's column order."""
        key = (spec.name, n)
        if key not in self._compiled:
            rows = [{c: sa.bindparam(f"r{i}_{c}") for c in spec.columns} for i in range(n)]
            compiled = self._on_conflict(spec, table, self._insert(table).values(rows)).compile(dialect=conn.dialect)
            if list(compiled.positiontup) != [f"r{i}_{c}" for i in range(n) for c in spec.columns]:
                raise SinkError(f"SQLAlchemy placed the parameters of a {spec.name} upsert out of row order; "
                                "report this with your SQLAlchemy version")
            self._compiled[key] = compiled.string
        return self._compiled[key]

    def _copy_upsert(self, conn: sa.Connection, spec: TableSpec, table: sa.Table, frame: pd.DataFrame) -> None:
        """New rows (where the table holds nothing at or after their first time: a tick's) are COPYed
        straight into the table; others into a temporary table dropped at commit, then moved by one
        INSERT ... SELECT ... ON CONFLICT."""
        from psycopg import errors, sql

        # A tick's rows straight in: the staging pass and the INSERT ... SELECT took a third of the write
        # (240,000 rows: 1.35-1.79 s against 0.91-1.30 s). Only into columns of exactly the types
        # forecastd writes, which the binary format needs. The savepoint covers a writer that got in between.
        if self._exact.get(spec.name) and self._all_new(conn, spec, table, frame):
            try:
                with conn.begin_nested():
                    self._copy(conn, spec, frame, sql.Identifier(*filter(None, (table.schema, table.name))))
                return
            except errors.UniqueViolation:
                log.info("%s: another writer added some of these keys; upserting them", self._qualified(spec))
        # Staged in forecastd's own types; the INSERT casts them to whatever compatible types the table has.
        stage = sa.Table(
            f"forecastd_stage_{uuid.uuid4().hex[:12]}", sa.MetaData(),
            *(sa.Column(c, _SQL_TYPES[d]) for c, d in spec.columns.items()),
            prefixes=["TEMPORARY"], postgresql_on_commit="DROP",
        )
        stage.create(conn)
        self._copy(conn, spec, frame, sql.Identifier(stage.name))
        # PostgreSQL assigns across numeric types and text lengths, but a boolean to an integer flag column
        # (which the table check accepts, as SQLite stores them) only by an explicit cast.
        cast = self._integer_flags.get(spec.name, ())
        source = sa.select(*(sa.cast(stage.c[c], sa.Integer) if c in cast else stage.c[c] for c in spec.columns))
        conn.execute(self._on_conflict(spec, table, self._insert(table).from_select(list(spec.columns), source)))

    def _copy(self, conn: sa.Connection, spec: TableSpec, frame: pd.DataFrame, target: Any) -> None:
        """COPY the frame's rows into `target` (a psycopg sql.Identifier) in the binary format, BATCH_ROWS
        rows a chunk (`pgbinary`)."""
        from psycopg import sql

        copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
            target, sql.SQL(", ").join(sql.Identifier(c) for c in spec.columns))
        with conn.connection.driver_connection.cursor() as cursor, cursor.copy(copy) as pipe:
            for chunk in pgbinary.copy_chunks(spec, frame, BATCH_ROWS):
                pipe.write(chunk)

    def _all_new(self, conn: sa.Connection, spec: TableSpec, table: sa.Table, frame: pd.DataFrame) -> bool:
        """Whether the table holds nothing at or after the frame's first time, so none of its keys can be
        there; asked only where an index starts with the time column. max() over it is one seek from the
        index's end, where a "LIMIT 1" filter may be planned as a scan of the whole table."""
        if not self._time_led.get(spec.name):
            return False
        last = conn.execute(sa.select(sa.func.max(table.c[spec.time]))).scalar()
        return last is None or pd.Timestamp(last) < pd.DatetimeIndex(frame[spec.time]).min().floor("us")

    def _on_conflict(self, spec: TableSpec, table: sa.Table, insert: Any) -> Any:
        return insert.on_conflict_do_update(
            index_elements=[table.c[k] for k in spec.key],
            set_={c: insert.excluded[c] for c in spec.values},
            # A replayed row changes nothing: no new tuple, no WAL, no trigger.
            where=sa.or_(*(table.c[c].is_distinct_from(insert.excluded[c]) for c in spec.values)),
        )

    def _sqlite_rows(self, spec: TableSpec, frame: pd.DataFrame, batch: int) -> Iterator[np.ndarray]:
        """SQLite rows of plain Python values in the contract's column order, `batch` rows at a time, as
        an object array (rows x columns): NaN and NaT become NULL. Each column is converted whole, and
        the array reshapes into statements' parameter lists without a Python loop over rows."""
        for start in range(0, len(frame), batch):
            part = frame.iloc[start:start + batch]
            block = np.empty((len(part), len(spec.columns)), dtype=object)
            for j, (name, dtype) in enumerate(spec.columns.items()):
                col = part[name]
                if dtype.startswith("datetime64"):
                    block[:, j] = _sqlite_times(col)
                elif dtype == "float64":
                    v = col.to_numpy(dtype=np.float64)
                    block[:, j] = v  # stored as Python floats
                    block[np.isnan(v), j] = None
                else:
                    block[:, j] = col.to_numpy(dtype=object) if dtype == "object" else col.to_numpy()
            yield block

    def _bind_time(self, t: pd.Timestamp) -> Any:
        # Drivers carry microseconds (flooring keeps `ts > since` exact). SQLite's DateTime ignores the
        # zone, so it gets UTC wall time; PostgreSQL gets an aware UTC value for timestamptz.
        t = t.tz_convert("UTC").floor("us")
        return t.tz_localize(None).to_pydatetime() if self.engine.dialect.name == "sqlite" else t.to_pydatetime()

    def _execute(self, conn: sa.Connection, spec: TableSpec, stmt: sa.Select) -> list[tuple]:
        # Plain tuples: pandas builds a frame from them 15x faster than from Row objects.
        try:
            return [tuple(row) for row in conn.execute(stmt)]
        except sa.exc.SQLAlchemyError as exc:
            raise SinkError(f"reading table {self._qualified(spec)!r} failed: {db_reason(exc, 'sink')}") from exc


def _exact(have: sa.types.TypeEngine, dtype: str) -> bool:
    """Whether a column of type `have` takes the binary values forecastd COPYs for `dtype` as they are
    (text or varchar, timestamptz, bigint, double precision, boolean); others go through a cast."""
    if dtype == "object":
        return isinstance(have, sa.String) and not isinstance(have, sa.CHAR)
    if dtype == "float64":
        return isinstance(have, postgresql.DOUBLE_PRECISION)
    return isinstance(have, {"int64": sa.BigInteger, "bool": sa.Boolean}.get(dtype, sa.DateTime))


def _in_stored_order(frame: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """A conformed frame (sorted by key, series first) in the order of the stored key, time first, so
    rows reach the index in its own order. A stable sort on time alone keeps the rest of the key's order."""
    times = pd.DatetimeIndex(frame[spec.time]).asi8
    if len(times) < 2 or (times[1:] >= times[:-1]).all():
        return frame
    return frame.take(np.argsort(times, kind="stable"))


def _sqlite_times(col: pd.Series) -> list[str | None]:
    """The text SQLAlchemy's SQLite DateTime stores for each value's UTC wall time, floored to
    microseconds like _bind_time, so keys written by either path compare equal. A write holds few
    distinct times (one per step and horizon), so only those are formatted."""
    utc = pd.DatetimeIndex(col).tz_convert("UTC")
    missing = utc.isna()
    distinct, inverse = np.unique(np.floor_divide(utc.asi8[~missing], 1000), return_inverse=True)
    text = np.datetime_as_string(distinct.astype("datetime64[us]"), unit="us")  # 2024-01-31T05:00:00.000000
    formatted = np.array([t.replace("T", " ") for t in text.tolist()], dtype=object)
    out = np.full(len(utc), None, dtype=object)
    out[~missing] = formatted[inverse.reshape(-1)]
    return out.tolist()

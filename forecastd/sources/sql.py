"""SQL source: SQLAlchemy 2 Core over a reflected table, filters as bound parameters.

User-supplied table, column and series names never enter SQL text: the table is reflected, columns are
looked up on it, values are bound. SQLAlchemy quotes the identifiers it renders.

Time filters follow the stored type of the time column:
- a timestamp column (PostgreSQL timestamptz / timestamp, ...) is compared with a bound datetime;
- SQLite has no timestamp type: every timestamp there is text. Lexicographic comparison is only right
  when every value and the bound share one shape, and SQLite tables often mix shapes ('T' or ' ' as the
  separator, with or without fractions, 'Z' or '+02:00' suffixes; pandas, SQLAlchemy and hand-written
  rows each differ). So on SQLite the value is normalised with SQLite's own ISO-8601 parser,
  strftime('%Y-%m-%d %H:%M:%f', ts), which reads all those shapes (and converts offset-bearing ones to
  UTC), and is compared with the bound in that normalised shape. Normalisation keeps milliseconds, so
  text timestamps are compared at millisecond resolution. A coarse test on the raw column
  (`mapping.text_scan`) comes first, so an index on the column still narrows the scan.
- text columns on other databases get the same coarse test, and the rows it lets through are filtered
  exactly once read, on their parsed times (`mapping.text_within`): text with offsets that change at a
  DST change does not sort in time order, and casting it in SQL fails the whole query on one bad value.
- PostgreSQL's 'infinity' and '-infinity' timestamps have no Python value (the driver fails the whole
  query on one): they come back as NULL, which validation counts as a bad timestamp, from unbounded
  reads, and bounded reads leave them out, like NULL.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import sqlalchemy as sa

from forecastd.config import Config, mask_password
from forecastd.errors import ForecastdError, SourceError
from forecastd.sources.mapping import (
    COLUMNS,
    ColumnMap,
    SAMPLES,
    SHAPE_CHECKS,
    empty_raw,
    has_offset,
    iso_sample,
    local_naive,
    melt,
    mixed_shapes,
    mixed_warning,
    text_offsets,
    text_scan,
    text_within,
    utc_bound,
)

__all__ = ["SqlSource", "connect", "db_reason", "make_engine", "resolve_url", "describe_url", "SERIES_CHUNK"]

log = logging.getLogger(__name__)

# Series ids bound per IN (...) list. Old SQLite builds allow 999 bound variables a statement; staying
# under that keeps one code path for every database, and a long list just becomes several queries.
SERIES_CHUNK = 500

# strftime format that SQLite's date functions normalise ISO-8601 text to.
_SQLITE_NORMAL = "%Y-%m-%d %H:%M:%f"


def resolve_url(
    url: str, config: Config, *, error: type[ForecastdError] = SourceError, section: str = "source"
) -> str:
    """An SQLAlchemy URL with a relative SQLite path resolved against the config file's directory."""
    u = _parse_url(url, error, section)
    db = u.database
    if u.get_backend_name() == "sqlite" and db and db != ":memory:" and not db.startswith("file:"):
        return u.set(database=str(config.resolve(db))).render_as_string(hide_password=False)
    return url


def describe_url(url: str | sa.URL) -> str:
    """The URL for messages and logs, password hidden."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return "<unparseable url>"


def make_engine(url: str, *, error: type[ForecastdError] = SourceError, section: str = "source",
                lock_timeout: float = 0.0) -> sa.Engine:
    """One engine per source or sink, reused for every call; pre-ping drops connections a restart killed.

    With `lock_timeout` (seconds, 0 = the database's own) a statement waiting that long for a lock another
    session holds fails instead: PostgreSQL's `lock_timeout` for each connection (its default waits for
    ever, and a daemon stuck there ignores SIGTERM), SQLite's busy timeout (the driver's default is 5 s).
    """
    u = _parse_url(url, error, section)
    if u.drivername == "postgresql":
        # Bare postgresql:// means psycopg2 to SQLAlchemy; forecastd ships with psycopg 3.
        u = u.set(drivername="postgresql+psycopg")
    backend = u.get_backend_name()
    args = {"timeout": lock_timeout} if backend == "sqlite" and lock_timeout and "timeout" not in u.query else {}
    try:
        engine = sa.create_engine(u, pool_pre_ping=True, connect_args=args)
    except ImportError as exc:
        raise error(
            f"[{section}] url {describe_url(u)!r} needs a database driver that is not installed ({exc}); "
            "install it, e.g. pip install 'psycopg[binary]' for PostgreSQL"
        ) from exc
    except sa.exc.ArgumentError as exc:
        raise error(f"[{section}] url {describe_url(u)!r} is not usable: {exc}") from exc
    if lock_timeout and backend == "postgresql":
        # A SET on each new connection rather than libpq's startup `options`, which PgBouncer refuses.
        statement = f"SET lock_timeout = {max(1, round(lock_timeout * 1000))}"  # milliseconds

        @sa.event.listens_for(engine, "connect")
        def _set_lock_timeout(dbapi_connection, _record) -> None:
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True  # a session setting, outside any transaction
            with dbapi_connection.cursor() as cursor:
                cursor.execute(statement)
            dbapi_connection.autocommit = autocommit
    return engine


def _parse_url(url: str, error: type[ForecastdError], section: str) -> sa.URL:
    try:
        return sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise error(
            f"[{section}] url = {mask_password(url)!r} is not an SQLAlchemy URL; use e.g. \"sqlite:///data.db\" or "
            "\"postgresql+psycopg://user@host:5432/db\""
        ) from None



def db_reason(exc: BaseException, section: str | None = None) -> str:
    """The driver's own message, on one line (libpq spreads its messages over several); for a lock that
    outlasted [section] lock_timeout, also what that means and what to do."""
    driver = getattr(exc, "orig", None) or exc
    reason = " ".join(str(driver).split())
    locked = getattr(driver, "sqlstate", None) == "55P03" or "database is locked" in reason  # PostgreSQL, SQLite
    if section and locked:
        reason += (f" (another session held a lock on the table past [{section}] lock_timeout: end that "
                   "session's transaction or raise the setting; the daemon tries again at its next tick)")
    return reason


@contextmanager
def connect(engine: sa.Engine, error: type[ForecastdError], section: str) -> Iterator[sa.Connection]:
    """A connection whose failure to open says where and what to check."""
    try:
        conn = engine.connect()
    except sa.exc.SQLAlchemyError as exc:
        raise error(
            f"cannot connect to the database at {describe_url(engine.url)}: {db_reason(exc)}; check "
            f"[{section}] url and that the server is running and reachable"
        ) from exc
    with conn:
        yield conn


def _ordered_whole(index: dict[str, Any]) -> bool:
    """Whether a reflected index is ordered (b-tree) and covers every row (no WHERE)."""
    options = index.get("dialect_options") or {}
    return (options.get("postgresql_using", "btree") == "btree" and options.get("postgresql_where") is None
            and options.get("sqlite_where") is None)


class SqlSource:
    """Reads the long frame from one SQL table or view; see forecastd.sources.Source for the contract."""

    def __init__(
        self,
        url: str,
        table: str,
        *,
        db_schema: str | None = None,
        layout: Literal["long", "wide"] = "long",
        series_column: str = "series_id",
        time_column: str = "ts",
        value_column: str = "value",
        value_columns: Sequence[str] = (),
        timezone: str = "UTC",
        order_column: str | None = None,
        lock_timeout: float = 0.0,
        engine: sa.Engine | None = None,
    ) -> None:
        self.url = url
        self.table_name = table
        self.db_schema = db_schema
        self.order_column = order_column
        self.columns = ColumnMap(layout, series_column, time_column, value_column, tuple(value_columns), timezone)
        self.engine = engine if engine is not None else make_engine(url, lock_timeout=lock_timeout)
        # Reflected on first use, not here: a daemon may start before its database does.
        self._table: sa.Table | None = None
        self._sample: Any = None  # a stored time value, for text timestamps
        self._text_zone: str | None = None  # SQLite: the zone of normalised time text
        self._text_offset = True  # SQLite: whether time text carries offsets (the stored sample's shape)
        self._mixed = False  # whether time text was seen both with offsets and without (`mixed_shapes`)
        self._series_leads_index: bool | None = None  # whether an index starts with the series column

    def __repr__(self) -> str:
        return f"SqlSource({describe_url(self.url)!r}, table={self.table_name!r})"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def read(
        self,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        series: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        since, until = utc_bound(since, "since"), utc_bound(until, "until")
        frame = self._read(since, until, series)
        # None: the read found the column's time text to mix shapes; again, scanning as wide as both need.
        return frame if frame is not None else self._read(since, until, series)

    def _read(
        self, since: pd.Timestamp | None, until: pd.Timestamp | None, series: Sequence[str] | None
    ) -> pd.DataFrame | None:
        cm = self.columns
        bounded = since is not None or until is not None
        with self._connect() as conn:
            table = self._reflect(conn)
            time_col = table.c[cm.time_column]
            where, text = self._time_filter(conn, time_col, since, until)
            # In time order: a table has none of its own (a parallel scan interleaves its workers' rows, a
            # row written into space a VACUUM freed comes back before older ones), and `duplicates`
            # needs one among rows sharing a time.
            order = self._time_order(time_col) + ([table.c[self.order_column]] if self.order_column else [])
            if cm.layout == "wide":
                value_columns = cm.wide_columns(self._numeric(table), series)
                if not value_columns:
                    return empty_raw()
                stmt = sa.select(self._time_select(time_col), *(table.c[c] for c in value_columns)).where(*where)
                stmt = stmt.order_by(*order)
                rows = self._execute(conn, stmt)
                if self._newly_mixed(conn, time_col, rows, 0) and bounded:
                    return None
                if text:
                    rows = self._within(rows, 0, since, until)
                # By position: the time column first, then the series columns, whatever their names.
                return melt(pd.DataFrame.from_records(rows, columns=range(len(value_columns) + 1)), value_columns)
            series_col = table.c[cm.series_column]
            stmt = sa.select(
                series_col.label("series_id"),
                self._time_select(time_col).label("ts"),
                table.c[cm.value_column].label("value"),
            ).where(*where).order_by(*order)
            if series is None:
                rows = self._execute(conn, stmt)
            else:
                ids = [str(s) for s in series]
                key = series_col if isinstance(series_col.type, sa.String) else sa.cast(series_col, sa.String)
                rows = []
                for start in range(0, len(ids), SERIES_CHUNK):
                    rows += self._execute(conn, stmt.where(key.in_(ids[start:start + SERIES_CHUNK])))
            if self._newly_mixed(conn, time_col, rows, 1) and bounded:
                return None
            if text:
                rows = self._within(rows, 1, since, until)
        frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS)) if rows else empty_raw()
        if frame["series_id"].dtype.kind == "f":
            # Integer ids with a NULL among them come back as floats, and series 7 would become "7.0" for
            # this read alone: the ids as `series_ids` names them.
            frame["series_id"] = pd.Series([None if r[0] is None else str(r[0]) for r in rows], dtype=object)
        log.debug("read %d rows from table %r", len(frame), self.table_name)
        return frame

    def series_ids(self) -> list[str]:
        cm = self.columns
        with self._connect() as conn:
            table = self._reflect(conn)
            if cm.layout == "wide":
                return cm.wide_columns(self._numeric(table), None)
            column = table.c[cm.series_column]
            if self._series_indexed(conn, table):
                rows = self._execute(conn, _skip_scan(column))
            else:
                rows = self._execute(conn, sa.select(column).where(column.is_not(None)).distinct())
        return sorted({str(row[0]) for row in rows})

    def _series_indexed(self, conn: sa.Connection, table: sa.Table) -> bool:
        """Whether a b-tree index over all rows (or the primary key) starts with the series column, checked
        once. Each step of the skip scan is an ordered seek: through a hash index (no order) or a partial
        one (not every row) it became a scan of the table per series, 15 s for 300 series in 432k rows."""
        if self._series_leads_index is None:
            try:
                inspector = sa.inspect(conn)
                where = {"table_name": table.name, "schema": self.db_schema}
                leads = [inspector.get_pk_constraint(**where).get("constrained_columns") or []]
                leads += [i.get("column_names") or [] for i in inspector.get_indexes(**where) if _ordered_whole(i)]
            except (sa.exc.SQLAlchemyError, NotImplementedError):  # a view has no indexes of its own
                leads = []
            self._series_leads_index = any(c and c[0] == self.columns.series_column for c in leads)
            log.debug("table %r: series listed by %s", self.table_name,
                      "index skip scan" if self._series_leads_index else "DISTINCT")
        return self._series_leads_index

    # -- table -------------------------------------------------------------------------------------

    def _where(self) -> str:
        schema = f" in schema {self.db_schema!r}" if self.db_schema else ""
        return f"table {self.table_name!r}{schema} at {describe_url(self.engine.url)}"

    def _connect(self) -> contextlib.AbstractContextManager[sa.Connection]:
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            # SQLite would create an empty file for a mistyped path; a source only reads.
            path = url.database.removeprefix("file:").split("?")[0]
            if not os.path.exists(path):
                raise SourceError(
                    f"SQLite database {path!r} does not exist; check [source] url (relative paths resolve "
                    "against the config file's directory)"
                )
        return connect(self.engine, SourceError, "source")

    def _reflect(self, conn: sa.Connection) -> sa.Table:
        if self._table is not None:
            return self._table
        try:
            inspector = sa.inspect(conn)
            if not inspector.has_table(self.table_name, schema=self.db_schema):
                self._missing_table(inspector)
            table = sa.Table(self.table_name, sa.MetaData(), autoload_with=conn, schema=self.db_schema)
        except sa.exc.SQLAlchemyError as exc:
            raise SourceError(f"cannot inspect {self._where()}: {db_reason(exc, 'source')}") from exc
        self.columns.check(list(table.c.keys()), self._where(),
                           {self.order_column: "order_column"} if self.order_column else None)
        self._table = table
        return table

    def _missing_table(self, inspector: sa.Inspector) -> None:
        if self.db_schema and self.db_schema not in inspector.get_schema_names():
            raise SourceError(
                f"schema {self.db_schema!r} does not exist at {describe_url(self.engine.url)}; set [source] "
                "db_schema to an existing schema or remove it"
            )
        names = inspector.get_table_names(schema=self.db_schema) + inspector.get_view_names(schema=self.db_schema)
        listing = ", ".join(repr(n) for n in sorted(names)) or "none"
        raise SourceError(
            f"{self._where()} does not exist; tables there are: {listing}; set [source] table to one of them"
        )

    def _numeric(self, table: sa.Table) -> list[str]:
        # SQLAlchemy 2.1's Float is no Numeric subclass, so both are named.
        return [c.name for c in table.c if isinstance(c.type, (sa.Integer, sa.Float, sa.Numeric))]

    def _execute(self, conn: sa.Connection, stmt: sa.Executable) -> list[tuple]:
        # Plain tuples: pandas builds a frame from them 15x faster than from Row objects, which it
        # probes attribute by attribute.
        try:
            return [tuple(row) for row in conn.execute(stmt)]
        except sa.exc.SQLAlchemyError as exc:
            raise SourceError(f"query on {self._where()} failed: {db_reason(exc, 'source')}") from exc

    # -- time --------------------------------------------------------------------------------------

    def _time_select(self, column: sa.Column) -> sa.ColumnElement:
        # SQLite values come back as the stored text: SQLAlchemy's DATETIME parser rejects the 'T' and
        # offset shapes, and parsing belongs to forecastd.frames.validate anyway.
        if self.dialect == "sqlite":
            return sa.type_coerce(column, sa.String)
        if self._infinite(column):
            return sa.case((sa.func.isfinite(column, type_=sa.Boolean), column), else_=sa.null())
        return column

    def _time_order(self, column: sa.Column) -> list[sa.ColumnElement]:
        """ORDER BY terms for time order. SQLite stores text, whose order is not time's where offsets
        differ ('04:00+01:00' is after '04:00+02:00'): its julianday() reads the offset (NULL for text it
        cannot read, which validate rejects), and the text breaks ties below its resolution."""
        if self.dialect == "sqlite":
            return [sa.func.julianday(column), column]
        return [column]

    def _infinite(self, column: sa.Column) -> bool:
        """Whether the column may hold PostgreSQL's 'infinity' and '-infinity' (timestamps and dates)."""
        return self.dialect == "postgresql" and isinstance(column.type, (sa.DateTime, sa.Date))

    def _within(
        self, rows: list[tuple], index: int, since: pd.Timestamp | None, until: pd.Timestamp | None
    ) -> list[tuple]:
        """The rows whose time text (at `index`) lies in (since, until]: the exact filter after the coarse
        one in SQL."""
        if not rows:
            return rows
        keep = text_within(pa.array([r[index] for r in rows], type=pa.string()), since, until, self.columns.timezone)
        return [r for r, k in zip(rows, keep) if k]

    def _newly_mixed(self, conn: sa.Connection, column: sa.Column, rows: list[tuple], index: int) -> bool:
        """Whether these rows' time text shows the column to mix text with offsets and text without, for
        the first time (logged once); from then on every read scans as wide as both need."""
        if self._mixed or not rows or not (self.dialect == "sqlite" or isinstance(column.type, sa.String)):
            return False
        every = max(1, len(rows) // SHAPE_CHECKS)  # a whole-table read: evenly spaced rows stand for it
        texts = pa.array([r[index] if isinstance(r[index], str) else None for r in rows[::every]], type=pa.string())
        pair = mixed_shapes(self._stored_sample(conn, column), texts)
        if pair is None:
            return False
        self._mixed = True
        log.warning("%s", mixed_warning(self._where(), column.name, pair))
        return True

    def _stored_sample(self, conn: sa.Connection, column: sa.Column) -> Any:
        if self._sample is None:
            stmt = sa.select(sa.type_coerce(column, sa.String)).where(column.is_not(None)).limit(SAMPLES)
            self._sample = iso_sample([r[0] for r in self._execute(conn, stmt)])
        return self._sample

    def _time_filter(
        self, conn: sa.Connection, column: sa.Column, since: pd.Timestamp | None, until: pd.Timestamp | None
    ) -> tuple[list[sa.ColumnElement[bool]], bool]:
        """The WHERE clauses, and whether they are the coarse ones of text times (`_within` then filters
        the rows read exactly)."""
        if since is None and until is None:
            return [], False
        zone = self.columns.timezone
        if self.dialect == "sqlite":
            # A column mixing shapes has no one clock to compare normalised text on: the rows the coarse
            # test lets through are filtered exactly once read, as other databases' text is.
            return self._sqlite_text_filter(conn, column, since, until), self._mixed
        kind = column.type
        if isinstance(kind, sa.DateTime):
            def value(b: pd.Timestamp) -> Any:
                b = b.floor("us")  # drivers carry microseconds; flooring is exact for stored values
                return b.to_pydatetime() if kind.timezone else local_naive(b, zone).to_pydatetime()
        elif isinstance(kind, sa.Date):
            def value(b: pd.Timestamp) -> Any:
                return local_naive(b, zone).date()
        elif isinstance(kind, sa.String):
            sample = self._stored_sample(conn, column)
            if sample is None:
                return [sa.false()], False
            low, high = text_scan(since, until, zone, text_offsets(str(sample), self._where()) or self._mixed)
            out = []
            if low is not None:
                out.append(column >= sa.bindparam("since_hour", low, type_=kind))
            if high is not None:
                out.append(column < sa.bindparam("until_day", high, type_=kind))
            return out, True
        else:
            raise SourceError(
                f"time column {column.name!r} of {self._where()} has type {kind}; forecastd needs a timestamp, "
                "date or ISO-8601 text column; set [source] time_column to one"
            )
        # 'infinity' passes `> since` and would come back, as NULL (`_time_select`), at every tick.
        out = [sa.func.isfinite(column, type_=sa.Boolean)] if self._infinite(column) else []
        if since is not None:
            out.append(column > sa.bindparam("since", value(since), type_=kind))
        if until is not None:
            out.append(column <= sa.bindparam("until", value(until), type_=kind))
        return out, False

    def _sqlite_text_filter(
        self, conn: sa.Connection, column: sa.Column, since: pd.Timestamp | None, until: pd.Timestamp | None
    ) -> list[sa.ColumnElement[bool]]:
        zone = self._sqlite_zone(conn, column)
        if zone is None:  # no timestamps at all: nothing can match a bound
            return [sa.false()]
        raw = sa.type_coerce(column, sa.String)
        normal = sa.func.strftime(sa.bindparam("normal_format", _SQLITE_NORMAL, type_=sa.String), column)
        low, high = text_scan(since, until, self.columns.timezone, self._text_offset or self._mixed)
        # The exact test compares normalised text on one clock, which a column mixing shapes does not have:
        # its rows are filtered exactly once read (`_time_filter`).
        exact = not self._mixed
        out = []
        if since is not None:
            out.append(raw >= sa.bindparam("since_hour", low, type_=sa.String))
            if exact:
                out.append(normal > sa.bindparam("since", _sqlite_normal(local_naive(since, zone)), type_=sa.String))
        if until is not None:
            out.append(raw < sa.bindparam("until_day", high, type_=sa.String))
            if exact:
                out.append(normal <= sa.bindparam("until", _sqlite_normal(local_naive(until, zone)), type_=sa.String))
        return out

    def _sqlite_zone(self, conn: sa.Connection, column: sa.Column) -> str | None:
        """The zone SQLite's normalised text is in ('UTC' for offset-bearing values), checked once."""
        if self._text_zone is not None:
            return self._text_zone
        sample = self._stored_sample(conn, column)
        if sample is None:
            return None
        if not isinstance(sample, str):
            raise SourceError(
                f"time column {column.name!r} of {self._where()} holds numbers (e.g. {sample!r}); forecastd reads "
                "ISO-8601 text such as '2024-01-31 13:00:00' from SQLite; convert the column or read a view that "
                "formats it"
            )
        if self._execute(conn, sa.select(sa.func.strftime(_SQLITE_NORMAL, sample)))[0][0] is None:
            raise SourceError(
                f"time values of {self._where()} are text SQLite cannot read as ISO-8601 (e.g. {sample!r}); "
                "store them as 'YYYY-MM-DD HH:MM:SS[.fff]' with an optional 'Z' or '+HH:MM' suffix"
            )
        # Offset-bearing text normalises to UTC; naive text stays wall-clock time in the configured zone.
        # Like the text bounds of other databases, the stored sample's shape stands for the column's.
        self._text_offset = has_offset(sample)
        self._text_zone = "UTC" if self._text_offset else self.columns.timezone
        return self._text_zone


def _skip_scan(column: sa.Column) -> sa.Select:
    """The column's distinct non-null values, one index seek each: the next value is the smallest above
    the last (a recursive CTE; neither SQLite nor PostgreSQL skips through an index for DISTINCT). For
    10,000 series in 2 million rows on SQLite: 42 ms, against 203 ms for DISTINCT over the same index."""
    ids = sa.select(sa.func.min(column).label("s")).cte("forecastd_series_ids", recursive=True)
    after = sa.select(sa.func.min(column)).where(column > ids.c.s).scalar_subquery()
    ids = ids.union_all(sa.select(after).where(ids.c.s.is_not(None)))
    return sa.select(ids.c.s).where(ids.c.s.is_not(None))


def _sqlite_normal(t: pd.Timestamp) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}.{t.microsecond // 1000:03d}"

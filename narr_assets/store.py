"""DuckDB schema and writes: the data contract researchers query.

Every write is one transaction (replace-by-key), so a crash leaves the old rows or the new
rows, never half. Write connections are opened per write and closed at once: DuckDB lets one
process hold a file for writing at a time, so parallel runs take turns for the few
milliseconds a partition write needs instead of blocking each other for a whole run.
While another process holds the file (an open `duckdb` session, another `narr`), opening a
connection waits - retrying every 0.2 s, saying so every 10 s - for up to `NARR_DB_LOCK_WAIT`
seconds (default 60), then raises `DatabaseLockedError` naming the holder and what to do.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
from dagster_duckdb import DuckDBResource

from narr_assets import settings
from narr_assets.private import private_database, private_dir
from narr_assets.vocabulary import ANSWER_ERRORS, sql_list

# Query parameters: positional (`?`, a sequence) or named (`$name`, a mapping), never both.
Params = Sequence[Any] | Mapping[str, Any] | None

SCHEMA = """
CREATE TABLE IF NOT EXISTS raw_narratives (
    incident_id VARCHAR, narrative_type VARCHAR, narrative_text VARCHAR,
    manual_flag_ind TINYINT, manual_flag TINYINT, label_error VARCHAR, attributes JSON,
    source_path VARCHAR, source_sheet VARCHAR, source_row INTEGER,
    data_checksum VARCHAR, loaded_at TIMESTAMPTZ, text_error VARCHAR
);
-- Databases created before `text_error` existed (a narrative cell that could not be read).
ALTER TABLE raw_narratives ADD COLUMN IF NOT EXISTS text_error VARCHAR;
CREATE TABLE IF NOT EXISTS narratives (
    incident_id VARCHAR NOT NULL, narrative_type VARCHAR NOT NULL, narrative_text VARCHAR NOT NULL,
    manual_flag_ind TINYINT, manual_flag TINYINT, is_placeholder BOOLEAN, text_hash VARCHAR,
    attributes JSON, source_path VARCHAR, source_row INTEGER, data_checksum VARCHAR,
    loaded_at TIMESTAMPTZ, batch_id VARCHAR,
    PRIMARY KEY (incident_id, narrative_type)
);
CREATE TABLE IF NOT EXISTS rejected_rows (
    source_path VARCHAR, source_row INTEGER, incident_id VARCHAR, narrative_type VARCHAR,
    reason VARCHAR, data_checksum VARCHAR
);
CREATE TABLE IF NOT EXISTS narrative_conflicts (
    incident_id VARCHAR, narrative_type VARCHAR, source_row INTEGER, text_hash VARCHAR,
    manual_flag_ind TINYINT, kept BOOLEAN, reason VARCHAR, data_checksum VARCHAR
);
CREATE TABLE IF NOT EXISTS batch_ledger (
    incident_id VARCHAR NOT NULL, narrative_type VARCHAR NOT NULL, batch_id VARCHAR NOT NULL,
    added_at TIMESTAMPTZ DEFAULT current_timestamp,
    PRIMARY KEY (incident_id, narrative_type)
);
CREATE TABLE IF NOT EXISTS batch_versions (
    batch_id VARCHAR NOT NULL, content_hash VARCHAR NOT NULL, revision INTEGER NOT NULL,
    recorded_at TIMESTAMPTZ DEFAULT current_timestamp,
    PRIMARY KEY (batch_id, revision)
);
CREATE TABLE IF NOT EXISTS removed_narratives (
    incident_id VARCHAR NOT NULL, narrative_type VARCHAR NOT NULL, text_hash VARCHAR, batch_id VARCHAR,
    removed_at TIMESTAMPTZ, data_checksum VARCHAR,
    PRIMARY KEY (incident_id, narrative_type)
);
CREATE TABLE IF NOT EXISTS ingest_log (
    data_checksum VARCHAR, source_path VARCHAR, loaded_at TIMESTAMPTZ, stats JSON
);
CREATE TABLE IF NOT EXISTS classification_rows (
    experiment VARCHAR NOT NULL, batch_id VARCHAR NOT NULL,
    incident_id VARCHAR NOT NULL, narrative_type VARCHAR NOT NULL,
    text_hash VARCHAR, config_hash VARCHAR, status VARCHAR NOT NULL,
    detected BOOLEAN, confidence DOUBLE, indicators JSON, rationale VARCHAR, error VARCHAR,
    answer_source VARCHAR, raw_content VARCHAR, raw_reasoning VARCHAR, finish_reason VARCHAR,
    model VARCHAR, prompt_tokens INTEGER, completion_tokens INTEGER, reasoning_tokens INTEGER,
    latency_s DOUBLE, attempts INTEGER, from_journal BOOLEAN, parser_version VARCHAR,
    data_checksum VARCHAR, classified_at TIMESTAMPTZ, written_at TIMESTAMPTZ,
    PRIMARY KEY (experiment, incident_id, narrative_type)
);
CREATE TABLE IF NOT EXISTS experiment_evaluations (
    experiment VARCHAR PRIMARY KEY, config_hash VARCHAR, evaluation JSON, computed_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS run_log (
    experiment VARCHAR, config_hash VARCHAR, finished_at TIMESTAMPTZ, batches INTEGER,
    narratives INTEGER, calls_ok INTEGER, attempts INTEGER, reused INTEGER, skipped INTEGER,
    failed_batches INTEGER, active_seconds DOUBLE
);
-- One row per configuration an experiment has been evaluated under (`registry_row`); never a key.
CREATE TABLE IF NOT EXISTS experiment_registry (
    experiment VARCHAR NOT NULL, config_hash VARCHAR NOT NULL, backend VARCHAR, model VARCHAR,
    base_url VARCHAR, api_key_env VARCHAR, temperature DOUBLE, seed BIGINT, max_tokens INTEGER,
    reasoning_effort VARCHAR, prompt_version VARCHAR, system_prompt VARCHAR, user_template VARCHAR,
    output_mode VARCHAR, source_file VARCHAR, description VARCHAR, config JSON,
    first_seen TIMESTAMPTZ, last_seen TIMESTAMPTZ,
    PRIMARY KEY (experiment, config_hash)
);
CREATE OR REPLACE VIEW classifications AS
SELECT c.*, n.narrative_text, n.manual_flag_ind, n.manual_flag, n.is_placeholder, n.attributes,
       (n.text_hash IS DISTINCT FROM c.text_hash) AS is_stale
FROM classification_rows c
JOIN narratives n USING (incident_id, narrative_type);
CREATE OR REPLACE VIEW removed_classifications AS
SELECT c.*, r.text_hash AS removed_text_hash, r.removed_at, r.data_checksum AS removed_by_checksum
FROM classification_rows c
LEFT JOIN removed_narratives r USING (incident_id, narrative_type)
WHERE NOT EXISTS (
    SELECT 1 FROM narratives n WHERE n.incident_id = c.incident_id AND n.narrative_type = c.narrative_type
);
"""

# Each batch's content now (keys and text hashes of its narratives; labels left out on purpose:
# a label edit changes what `metrics` reports, never what a model is asked), next to the last
# content recorded in `batch_versions`. A batch's revision goes up each time its content
# changes - a revert included, so a key that was superseded is never handed out again.
_BATCH_CONTENT = """
WITH content AS (
    SELECT batch_id,
           md5(string_agg(incident_id || '|' || narrative_type || '|' || coalesce(text_hash, ''),
                          ',' ORDER BY incident_id, narrative_type)) AS content_hash
    FROM narratives GROUP BY batch_id
), latest AS (
    SELECT batch_id, arg_max(content_hash, revision) AS content_hash, max(revision) AS revision
    FROM batch_versions GROUP BY batch_id
), now AS (
    SELECT c.batch_id, c.content_hash,
           CASE WHEN l.content_hash = c.content_hash THEN l.revision ELSE coalesce(l.revision + 1, 0) END AS revision,
           l.content_hash IS DISTINCT FROM c.content_hash AS unrecorded
    FROM content c LEFT JOIN latest l USING (batch_id)
)
"""

# The current-row predicate, the one definition of which stored answer belongs to a narrative.
# A row `c` of `classification_rows` is *current* for a narrative `n` of `narratives` when it is
# the experiment's row for the narrative's key, asked with the experiment's current config
# about the narrative's current text. A row for another config (an edited prompt) or another
# text (an edited narrative) is not current: it stays in the table, but it never completes a
# batch and never enters an evaluation.
# The parser version is deliberately not part of it (see `Store.partition_status`): evaluation
# and the remaining-calls count use current rows whatever parser produced them.
# Named parameters: `$experiment`, `$config_hash`. Table aliases: `c` and `n`.
CURRENT_ROW = """(
    c.experiment = $experiment AND c.incident_id = n.incident_id AND c.narrative_type = n.narrative_type
    AND c.config_hash = $config_hash AND c.text_hash = n.text_hash
)"""

CLASSIFICATION_COLUMNS = (
    "experiment",
    "batch_id",
    "incident_id",
    "narrative_type",
    "text_hash",
    "config_hash",
    "status",
    "detected",
    "confidence",
    "indicators",
    "rationale",
    "error",
    "answer_source",
    "raw_content",
    "raw_reasoning",
    "finish_reason",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "latency_s",
    "attempts",
    "from_journal",
    "parser_version",
    "data_checksum",
    "classified_at",
    "written_at",
)

# The columns `ExperimentConfig.registry_row` fills; `first_seen` and `last_seen` are the store's.
REGISTRY_COLUMNS = (
    "experiment",
    "config_hash",
    "backend",
    "model",
    "base_url",
    "api_key_env",
    "temperature",
    "seed",
    "max_tokens",
    "reasoning_effort",
    "prompt_version",
    "system_prompt",
    "user_template",
    "output_mode",
    "source_file",
    "description",
    "config",
)


_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.RLock:
    """One lock per database file and process.

    DuckDB serialises writers across processes with its file lock; inside one process,
    concurrent connections that register DataFrames race in DuckDB's scanner setup ("pandas_scan
    does not exist"), so threads of one process take turns too.
    """
    key = str(path.resolve())
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.RLock())


# Waiting for a database file another process holds. DuckDB fails at once when the file is
# locked; `DuckDBResource.get_connection` retries 10 times with doubling sleeps (0.1 .. 51.2 s):
# it gives up after 102 s whatever the cause (a permission error takes 102 s to report too),
# and a lock freed at 27 s was taken at 51 s (measured). We retry lock conflicts only, every
# LOCK_POLL_S (jittered, so waiting processes do not retry in step), and say so after
# LOCK_NOTICE_AFTER_S, then every LOCK_PROGRESS_EVERY_S, until `NARR_DB_LOCK_WAIT` runs out.
LOCK_POLL_S = 0.2
LOCK_NOTICE_AFTER_S = 1.0
LOCK_PROGRESS_EVERY_S = 10.0
QUERY_SAFELY = 'README "Querying the database while narr runs"'

_LOCK_CONFLICT = "Could not set lock on file"
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.+?) \(PID (?P<pid>\d+)\)")


class DatabaseLockedError(RuntimeError):
    """Another process held the database file for longer than the lock wait."""


def lock_holder(message: str) -> str:
    """Who holds the lock, from DuckDB's error: `PID 123 (duckdb)`, else `another process`."""
    match = _LOCK_HOLDER.search(message)
    return f"PID {match['pid']} ({Path(match['program']).name})" if match else "another process"


def _to_stderr(line: str) -> None:
    print(f"narr: {line}", file=sys.stderr, flush=True)


def connect_waiting(
    database: str, config: Mapping[str, Any], wait_s: float, notify: Callable[[str], None] = _to_stderr
) -> duckdb.DuckDBPyConnection:
    """Open `database` for writing, waiting while another process holds its lock.

    Args:
        database: the DuckDB file.
        config: DuckDB connection options.
        wait_s: how long to keep retrying a lock conflict; 0 tries once.
        notify: called with a progress line while waiting (default: stderr).

    Returns:
        An open read-write connection.

    Raises:
        DatabaseLockedError: the file was still locked after `wait_s`; its message names the
            file, the holder (DuckDB's error gives the PID) and what to do.
        duckdb.Error: any other failure to open the file, at once.
    """
    started = time.monotonic()
    notice_at = started + LOCK_NOTICE_AFTER_S
    while True:
        try:
            return duckdb.connect(database, read_only=False, config=dict(config))
        except duckdb.IOException as exc:
            if _LOCK_CONFLICT not in str(exc):
                raise
            holder = lock_holder(str(exc))
        now = time.monotonic()
        waited = now - started
        if waited >= wait_s:
            raise DatabaseLockedError(
                f"{database} is locked by {holder} (waited {wait_s:g} s): close that session or let that process "
                f"finish, then run the command again; to query during a run use a snapshot or one-shot read-only "
                f"queries ({QUERY_SAFELY}); NARR_DB_LOCK_WAIT sets the wait"
            ) from None
        if now >= notice_at:
            notify(f"waiting for {database}: locked by {holder} ({waited:.0f} s of {wait_s:g} s)")
            notice_at = now + LOCK_PROGRESS_EVERY_S
        time.sleep(min(LOCK_POLL_S * random.uniform(0.5, 1.5), wait_s - waited))


class Store:
    """Reads and writes of the project's tables through a `DuckDBResource`.

    Args:
        resource: the database (a `DuckDBResource`, or a path).
        lock_wait_s: how long a connection waits for a file another process holds
            (default: `NARR_DB_LOCK_WAIT`).
        on_lock_wait: receives the progress lines of that wait (default: stderr).
    """

    def __init__(
        self,
        resource: DuckDBResource | str | Path,
        lock_wait_s: float | None = None,
        on_lock_wait: Callable[[str], None] = _to_stderr,
    ):
        if not isinstance(resource, DuckDBResource):
            resource = DuckDBResource(database=str(resource))
        self.resource = resource
        self.lock_wait_s = settings.db_lock_wait_s() if lock_wait_s is None else lock_wait_s
        self.on_lock_wait = on_lock_wait
        self._schema_ready = False

    @property
    def path(self) -> Path:
        return Path(self.resource.database)

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection with the schema in place."""
        private_dir(self.path.parent, tighten=False)
        with _process_lock(self.path), self._connection() as con:
            if not self._schema_ready:
                _exec(con, SCHEMA)
                private_database(self.path)  # DuckDB creates its files with the umask's mode
                self._schema_ready = True
            yield con

    @contextlib.contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection to the resource's file, waiting out another process's lock (see above)."""
        # The options `DuckDBResource.get_connection` would pass; we replace only its retry.
        config = {"custom_user_agent": "dagster", **self.resource.connection_config}
        con = connect_waiting(self.resource.database, config, self.lock_wait_s, self.on_lock_wait)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as con:
            _exec(con, "BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                _exec(con, "ROLLBACK")
                raise
            _exec(con, "COMMIT")

    def query_df(self, sql: str, params: Params = None) -> pd.DataFrame:
        with self.connect() as con:
            return con.execute(sql, params or []).df()

    def query_rows(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        """Every row of a query, as tuples of Python values (for small results)."""
        with self.connect() as con:
            return _exec(con, sql, params)

    def query_row(self, sql: str, params: Params = None) -> tuple[Any, ...]:
        """The first row of a query, as Python values (for aggregates: counts, sums)."""
        rows = self.query_rows(sql, params)
        if not rows:
            raise ValueError(f"the query returned no row: {' '.join(sql.split())[:120]}")
        return rows[0]

    # --- ingestion -------------------------------------------------------------------------

    def replace_raw(self, frame: pd.DataFrame) -> None:
        with self.transaction() as con:
            _exec(con, "DELETE FROM raw_narratives")
            _insert(con, "raw_narratives", frame)

    def replace_narratives(
        self,
        narratives: pd.DataFrame,
        rejected: pd.DataFrame,
        conflicts: pd.DataFrame,
        new_ledger_rows: pd.DataFrame,
        ingest: dict[str, Any],
        removed: pd.DataFrame | None = None,
    ) -> None:
        """Replace the cleaned tables and extend the batch ledger, all in one transaction.

        `removed` (`incident_id`, `narrative_type`, `text_hash`, `batch_id`) lists the stored
        narratives this ingest drops: they are flagged in `removed_narratives` (their results stay
        in `classification_rows`, shown by the `removed_classifications` view); a flagged
        narrative that is back in `narratives` is un-flagged.
        """
        with self.transaction() as con:
            if removed is not None and not removed.empty:
                flagged = removed.loc[:, ["incident_id", "narrative_type", "text_hash", "batch_id"]].assign(
                    removed_at=pd.Timestamp.now(tz="UTC"), data_checksum=ingest.get("data_checksum")
                )
                con.register("_removed", flagged)
                try:
                    _exec(con, "INSERT OR REPLACE INTO removed_narratives BY NAME SELECT * FROM _removed")
                finally:
                    con.unregister("_removed")
            for table, frame in (
                ("narratives", narratives),
                ("rejected_rows", rejected),
                ("narrative_conflicts", conflicts),
            ):
                _exec(con, f"DELETE FROM {table}")
                _insert(con, table, frame)
            _insert(con, "batch_ledger", new_ledger_rows)
            _exec(
                con,
                "INSERT INTO batch_versions (batch_id, content_hash, revision) "
                + _BATCH_CONTENT
                + "SELECT batch_id, content_hash, revision FROM now WHERE unrecorded",
            )
            _exec(
                con,
                "DELETE FROM removed_narratives r WHERE EXISTS (SELECT 1 FROM narratives n"
                " WHERE n.incident_id = r.incident_id AND n.narrative_type = r.narrative_type)",
            )
            _exec(
                con,
                "INSERT INTO ingest_log VALUES (?, ?, current_timestamp, ?)",
                [ingest.get("data_checksum"), ingest.get("source_path"), json.dumps(ingest, default=str)],
            )

    def read_raw(self) -> pd.DataFrame:
        return self.query_df("SELECT * FROM raw_narratives ORDER BY source_row, narrative_type")

    def read_narrative_versions(self) -> pd.DataFrame:
        """The stored narratives' keys, text hashes, labels and batches (no text)."""
        return self.query_df(
            "SELECT incident_id, narrative_type, text_hash, manual_flag_ind, manual_flag, batch_id FROM narratives"
        )

    def read_removed(self) -> pd.DataFrame:
        """The narratives flagged as removed from the source (`removed_narratives`)."""
        return self.query_df("SELECT * FROM removed_narratives ORDER BY incident_id, narrative_type")

    def read_ledger(self) -> pd.DataFrame:
        return self.query_df("SELECT incident_id, narrative_type, batch_id FROM batch_ledger")

    def read_narratives(self, batch_ids: Sequence[str] | None = None) -> pd.DataFrame:
        if batch_ids is None:
            return self.query_df("SELECT * FROM narratives ORDER BY batch_id, incident_id, narrative_type")
        return self.query_df(
            "SELECT * FROM narratives WHERE batch_id IN (SELECT unnest(?))"
            " ORDER BY batch_id, incident_id, narrative_type",
            [list(batch_ids)],
        )

    def batch_ids(self) -> list[str]:
        """Batches that hold at least one current narrative, in key order."""
        return list(self.query_df("SELECT DISTINCT batch_id FROM narratives ORDER BY 1")["batch_id"])

    def batch_versions(self) -> dict[str, str]:
        """Each batch's content version: 8 hex digits over its content and revision (`_BATCH_CONTENT`).

        Read-only: a content not recorded yet (a database from before `batch_versions`) gets the
        revision `replace_narratives` will record for it, so the answer never changes on recording.
        """
        rows = self.query_rows(
            _BATCH_CONTENT + "SELECT batch_id, left(md5(content_hash || ':' || revision), 8) FROM now ORDER BY batch_id"
        )
        return {str(batch): str(version) for batch, version in rows}

    def narratives_version(self) -> str:
        """A content version of the whole `narratives` table: keys, text hashes and labels."""
        (version,) = self.query_row(
            """
            SELECT md5(coalesce(string_agg(
                       concat_ws('|', incident_id, narrative_type, coalesce(text_hash, '-'), batch_id,
                                 coalesce(CAST(manual_flag_ind AS VARCHAR), '-'),
                                 coalesce(CAST(manual_flag AS VARCHAR), '-')),
                       ',' ORDER BY incident_id, narrative_type), ''))
            FROM narratives
            """
        )
        return str(version)

    def current_checksum(self) -> str | None:
        df = self.query_df("SELECT data_checksum FROM ingest_log ORDER BY loaded_at DESC LIMIT 1")
        return None if df.empty else str(df.iloc[0, 0])

    # --- classification --------------------------------------------------------------------

    def replace_partition(self, experiment: str, batch_id: str, rows: pd.DataFrame) -> None:
        """Replace one experiment's rows of one batch, atomically."""
        self.replace_partitions(experiment, {batch_id: rows})

    def replace_partitions(self, experiment: str, frames: dict[str, pd.DataFrame]) -> None:
        """Replace one experiment's rows of several batches in one transaction."""
        with self.transaction() as con:
            _exec(
                con,
                "DELETE FROM classification_rows WHERE experiment = ? AND batch_id IN (SELECT unnest(?))",
                [experiment, list(frames)],
            )
            non_empty = [f for f in frames.values() if not f.empty]
            if non_empty:
                _insert(
                    con,
                    "classification_rows",
                    pd.concat(non_empty, ignore_index=True) if len(non_empty) > 1 else non_empty[0],
                )

    def read_classifications(self, experiment: str, batch_ids: Sequence[str] | None = None) -> pd.DataFrame:
        sql = "SELECT * FROM classification_rows WHERE experiment = ?"
        params: list[Any] = [experiment]
        if batch_ids is not None:
            sql += " AND batch_id IN (SELECT unnest(?))"
            params.append(list(batch_ids))
        return self.query_df(sql + " ORDER BY batch_id, incident_id, narrative_type", params)

    def partition_status(self, experiment: str, config_hash: str, parser_version: str | None = None) -> pd.DataFrame:
        """Per batch of `narratives`: narratives, rows, current rows, error rows.

        - `rows`: the experiment's rows for the batch's narratives, current or not;
        - `current_rows`: rows that satisfy `CURRENT_ROW` *and* were parsed by `parser_version`
          (default: the installed `parsing.PARSER_VERSION`);
        - `error_rows`: rows with an answer-error status (`vocabulary.ANSWER_ERRORS`), current
          or not: a stale error row still marks its batch for `--retry-errors`.

        The parser version is where completeness and evaluation part ways, on purpose. A batch
        counts as complete (`status.partition_state`) only when every narrative has a current
        row parsed by the current parser, so a parser upgrade shows its batches as work:
        re-materialising re-parses the journalled answers without new calls (a backend that
        journals nothing, like `rules`, answers again, which is free). Evaluation and the
        remaining-calls count use `CURRENT_ROW` alone - rows for the current config and text,
        whatever parser produced them - so metrics do not vanish between a parser upgrade and
        the re-run.
        """
        if parser_version is None:
            from narr_assets.parsing import PARSER_VERSION as parser_version
        return self.query_df(
            f"""
            SELECT n.batch_id,
                   count(*) AS narratives,
                   count(c.status) AS rows,
                   count(*) FILTER (WHERE {CURRENT_ROW} AND c.parser_version = $parser_version) AS current_rows,
                   count(*) FILTER (WHERE c.status IN {sql_list(ANSWER_ERRORS)}) AS error_rows
            FROM narratives n
            LEFT JOIN classification_rows c
              ON c.experiment = $experiment AND c.incident_id = n.incident_id AND c.narrative_type = n.narrative_type
            GROUP BY n.batch_id ORDER BY n.batch_id
            """,
            {"experiment": experiment, "config_hash": config_hash, "parser_version": parser_version},
        )

    def log_run(self, summary: Any) -> None:
        """Record one engine run; `narr status` derives its rate from active time only."""
        with self.connect() as con:
            _exec(
                con,
                "INSERT INTO run_log VALUES (?, ?, current_timestamp, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    summary.experiment,
                    summary.config_hash,
                    len(summary.batches),
                    summary.narratives,
                    summary.calls_ok,
                    summary.attempts,
                    summary.reused,
                    summary.skipped,
                    len(summary.failed_batches),
                    summary.active_seconds,
                ],
            )

    def register_experiment(self, row: Mapping[str, Any]) -> None:
        """Insert or refresh one `experiment_registry` row, keeping its `first_seen`.

        Args:
            row: `ExperimentConfig.registry_row()`: every column of `REGISTRY_COLUMNS`.

        Raises:
            ValueError: when the row's columns are not exactly `REGISTRY_COLUMNS`.
        """
        if set(row) != set(REGISTRY_COLUMNS):
            raise ValueError(f"a registry row has the columns {', '.join(REGISTRY_COLUMNS)}, not {', '.join(row)}")
        refreshed = ", ".join(f"{c} = excluded.{c}" for c in REGISTRY_COLUMNS if c not in ("experiment", "config_hash"))
        with self.connect() as con:
            _exec(
                con,
                f"INSERT INTO experiment_registry ({', '.join(REGISTRY_COLUMNS)}, first_seen, last_seen) "
                f"VALUES ({', '.join('?' * len(REGISTRY_COLUMNS))}, current_timestamp, current_timestamp) "
                f"ON CONFLICT (experiment, config_hash) DO UPDATE SET {refreshed}, last_seen = excluded.last_seen",
                [row[c] for c in REGISTRY_COLUMNS],
            )

    def read_registry(self) -> pd.DataFrame:
        """Every `experiment_registry` row, oldest first within each experiment."""
        return self.query_df("SELECT * FROM experiment_registry ORDER BY experiment, first_seen, config_hash")

    def replace_evaluation(
        self, experiment: str, config_hash: str, tables: dict[str, pd.DataFrame], evaluation: dict[str, Any]
    ) -> None:
        """Replace one experiment's evaluation: the JSON document and its flat tables.

        `tables` maps a table name (e.g. `experiment_metrics`) to rows carrying an
        `experiment` column; a table is created from its first frame, then rows are replaced
        per experiment, so experiments evaluated at different times share one table.
        """
        with self.transaction() as con:
            for table, frame in tables.items():
                exists = _exec(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table])[0][
                    0
                ]
                if not exists:
                    con.register("_frame", frame)
                    _exec(con, f'CREATE TABLE "{table}" AS SELECT * FROM _frame LIMIT 0')
                    con.unregister("_frame")
                _exec(con, f'DELETE FROM "{table}" WHERE experiment = ?', [experiment])
                _insert(con, f'"{table}"', frame)
            _exec(con, "DELETE FROM experiment_evaluations WHERE experiment = ?", [experiment])
            _exec(
                con,
                "INSERT INTO experiment_evaluations VALUES (?, ?, ?, current_timestamp)",
                [experiment, config_hash, json.dumps(evaluation, default=str)],
            )

    def read_evaluations(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """experiment -> (config hash, evaluation document)."""
        rows = self.query_rows(
            "SELECT experiment, config_hash, evaluation FROM experiment_evaluations ORDER BY experiment"
        )
        return {experiment: (config_hash, json.loads(doc)) for experiment, config_hash, doc in rows}

    def replace_table(self, table: str, frame: pd.DataFrame) -> None:
        """Create or replace a derived table (leaderboard, disagreements) from a frame."""
        with self.transaction() as con:
            con.register("_frame", frame)
            _exec(con, f'CREATE OR REPLACE TABLE "{table}" AS SELECT * FROM _frame')
            con.unregister("_frame")


def _exec(con: duckdb.DuckDBPyConnection, sql: str, params: Params = None) -> list[tuple]:
    """Execute and drain: DuckDB refuses further work (even `register`) on a connection whose
    last result was not fetched."""
    return con.execute(sql, params or []).fetchall()


def _insert(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame) -> None:
    if frame is None or frame.empty:
        return
    con.register("_frame", frame)
    try:
        _exec(con, f"INSERT INTO {table} BY NAME SELECT * FROM _frame")
    finally:
        con.unregister("_frame")

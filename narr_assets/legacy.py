"""The R system's results and configs brought over: reading its SQLite databases, converting its YAML.

`narr import-legacy DB.sqlite` reads three tables of the R system's database (Python's
`sqlite3`, read-only): `experiments` (one row per run: model, temperature, prompt texts and
the precision/recall/F1 it stored), `narrative_results` (one row per narrative and
experiment: `detected` 0/1/NULL, confidence, indicators, rationale, raw response, tokens,
`error_occurred`) and `source_narratives` (the texts and manual labels). Keys are made ours on
the way in: narrative types in lower case (`CME` -> `cme`), incident ids as the user typed
them (R writes 100000 as `1e+05`; `ingest.normalise_incident_id` turns it back).

It writes one experiment file per legacy experiment (`backend: imported`, with a `legacy:`
section naming the database, the experiment id and the database's sha256) and, on request,
the narratives as a long-layout CSV usable as `NARR_SOURCE`. Such an experiment materialises
like any other, except that `classify_imported` takes each narrative's row from the database
instead of asking a model: matched by key *and* text hash (`narratives.text_hash` of the
trimmed text, as ingest computes it). Rows become ours as follows:

- a legacy answer with a verdict -> `ok`, its `detected`, confidence, indicators, rationale;
- a legacy error (`error_occurred`, or no verdict): `parse_error` when the R system got an
  answer (a raw response) it could not use, `rejected` when it has none (its request failed);
- no legacy row for the narrative, or a row for a different text (the narrative was edited
  since: *stale*) -> `rejected`, with an `error` saying which. `rejected` is the one stored
  status for "no answer was obtained for this text" (`vocabulary`: never sent or refused):
  it is an answer error, so the narrative stays in every strict denominator and out of the
  answered one, exactly as the R system's own error rows; `failed` cannot be stored and
  `skipped` would count it as a negative verdict. Nothing is ever dropped, and the run's log
  names the count and the first keys.

A legacy row without its text (`narrative_text` NULL) is matched by key alone. Placeholders
are not skipped and `run.*` limits do not apply: every narrative gets the R system's row, as
the R system asked them all. Of several rows for one key and text, the last written wins.

The "answered" precision/recall/F1 recomputed from these rows equals what the R system stored
(it left its error rows out); `import_legacy` recomputes it from the database at import time
and reports any difference.

`convert_legacy_config` turns one R experiment YAML file into ours (see `CONFIG_MAPPING`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import yaml

from narr_assets.classify.rows import WorkItem, row_identity, rows_frame
from narr_assets.classify.summary import RunSummary

# `_read_yaml` is the experiment loader's bounded reader (size, depth and alias-bomb limits).
from narr_assets.experiments import PLACEHOLDER, ExperimentConfig, ExperimentError, _read_yaml
from narr_assets.ingest import normalise_incident_id
from narr_assets.llm import redact
from narr_assets.narratives import text_hash
from narr_assets.private import write_private_bytes
from narr_assets.vocabulary import NARRATIVE_TYPES, OK, PARSE_ERROR, REJECTED

# Written at the top of every file `import_legacy` writes: only such a file is overwritten.
IMPORT_MARKER = "# Imported by `narr import-legacy`"
CONVERT_MARKER = "# Converted by `narr convert-legacy-config`"
# Stored and recomputed metrics closer than this are equal (R stores doubles, printed rounded).
METRIC_TOLERANCE = 1e-6
# Keys named in a log line or an error, at most.
_KEYS_SHOWN = 5

_EXPERIMENT_COLUMNS = (
    "experiment_id",
    "experiment_name",
    "status",
    "model_name",
    "model_provider",
    "temperature",
    "system_prompt",
    "user_template",
    "prompt_version",
    "prompt_author",
    "run_seed",
    "data_file",
    "api_url",
    "precision_ipv",
    "recall_ipv",
    "f1_ipv",
    "n_true_positive",
    "n_true_negative",
    "n_false_positive",
    "n_false_negative",
    "notes",
)
_RESULT_COLUMNS = (
    "experiment_id",
    "incident_id",
    "narrative_type",
    "narrative_text",
    "manual_flag_ind",
    "manual_flag",
    "detected",
    "confidence",
    "indicators",
    "rationale",
    "reasoning_steps",
    "raw_response",
    "response_sec",
    "processed_at",
    "error_occurred",
    "error_message",
    "prompt_tokens",
    "completion_tokens",
)
_SOURCE_COLUMNS = ("incident_id", "narrative_type", "narrative_text", "manual_flag_ind", "manual_flag", "loaded_at")
_REQUIRED = {
    "experiments": ("experiment_id", "experiment_name"),
    "narrative_results": ("experiment_id", "incident_id", "narrative_type", "detected"),
    "source_narratives": ("incident_id", "narrative_type", "narrative_text"),
}


# --- reading the database ----------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks.

    Args:
        path: The file.

    Returns:
        64 hex characters.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _connect(path: Path) -> sqlite3.Connection:
    """A read-only connection; a file that is not an SQLite database is refused in one line."""
    if not path.is_file():
        raise ExperimentError(f"{path}: legacy database not found (give the R system's .sqlite file)")
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        con.close()
        raise ExperimentError(f"{path}: not an SQLite database ({exc}); give the R system's results file") from None
    return con


def _columns(con: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in con.execute(f'PRAGMA table_info("{table}")')]


def _read_table(
    con: sqlite3.Connection, path: Path, table: str, wanted: Sequence[str], where: str = ""
) -> pd.DataFrame:
    """The `wanted` columns of a legacy table (missing optional ones as nulls), every value as stored."""
    present = {c.lower(): c for c in _columns(con, table)}
    if not present:
        raise ExperimentError(f"{path}: table {table} not found; is this an R system results database?")
    missing = [c for c in _REQUIRED[table] if c not in present]
    if missing:
        raise ExperimentError(f"{path}: table {table} has no column {', '.join(missing)}; cannot import it")
    select = ", ".join(f'"{present[c]}"' if c in present else f'NULL AS "{c}"' for c in wanted)
    # The row id names a bad row in an error: `SELECT * FROM <table> WHERE rowid = N` finds it.
    cursor = con.execute(f'SELECT {select}, rowid FROM "{table}" {where}')
    return pd.DataFrame(cursor.fetchall(), columns=[*wanted, "_rowid"], dtype=object)


def _key(incident_id: Any, narrative_type: Any) -> tuple[str | None, str | None]:
    """A legacy key made ours: `1e+05` -> `100000`, `CME` -> `cme`."""
    incident = normalise_incident_id(incident_id if not isinstance(incident_id, bytes) else incident_id.decode())
    ntype = None if narrative_type is None else str(narrative_type).strip().lower() or None
    return incident, ntype


def _flag(value: Any) -> int | None:
    """A 0/1 cell of SQLite (integer, real, text `TRUE`/`1`) as 0, 1 or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "t", "yes"):
        return 1
    if text in ("0", "0.0", "false", "f", "no"):
        return 0
    return None


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _with_keys(frame: pd.DataFrame, path: Path, table: str) -> pd.DataFrame:
    """`frame` with our keys; a row whose key cannot be made ours is an error naming it."""
    keys = [_key(i, t) for i, t in zip(frame["incident_id"], frame["narrative_type"], strict=True)]
    for (incident, ntype), rowid, given in zip(keys, frame["_rowid"], frame["narrative_type"], strict=True):
        if incident is None:
            raise ExperimentError(f"{path}: table {table}, rowid {rowid}, column incident_id: empty; fill it in")
        if ntype not in NARRATIVE_TYPES:
            raise ExperimentError(
                f"{path}: table {table}, rowid {rowid}, column narrative_type: {_text(given)!r} is not one of "
                f"{', '.join(NARRATIVE_TYPES)} (any case); fix the row"
            )
    out = frame.copy()
    out["incident_id"] = [k[0] for k in keys]
    out["narrative_type"] = [k[1] for k in keys]
    return out


@dataclass
class LegacyExperiment:
    """One row of the legacy `experiments` table, with the answered metrics of its rows."""

    info: dict[str, Any]
    n_rows: int = 0
    n_errors: int = 0
    recomputed: dict[str, float | None] = field(default_factory=dict)

    @property
    def experiment_id(self) -> int:
        return int(self.info["experiment_id"])

    def differences(self) -> list[str]:
        """One phrase per stored metric that differs from the recomputed one (empty: they agree)."""
        out = []
        for ours, theirs in (("precision", "precision_ipv"), ("recall", "recall_ipv"), ("f1", "f1_ipv")):
            stored, mine = _number(self.info.get(theirs)), self.recomputed.get(ours)
            if stored is None and mine is None:
                continue
            if stored is None or mine is None or abs(stored - mine) > METRIC_TOLERANCE:
                shown = "none" if stored is None else f"{stored:.6f}"
                out.append(f"{ours} stored {shown}, recomputed {'none' if mine is None else f'{mine:.6f}'}")
        return out


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def answered_metrics(rows: pd.DataFrame) -> dict[str, float | None]:
    """Narrative-level precision, recall and F1 over the answered, labelled rows (the R system's way).

    Args:
        rows: Legacy `narrative_results` rows of one experiment.

    Returns:
        `precision`, `recall`, `f1` (None when a denominator is zero) and the counts `tp`,
        `fp`, `fn`, `tn`.
    """
    tp = fp = fn = tn = 0
    for detected, label, error in zip(rows["detected"], rows["manual_flag_ind"], rows["error_occurred"], strict=True):
        verdict, truth = _flag(detected), _flag(label)
        if _flag(error) == 1 or verdict is None or truth is None:
            continue
        tp += verdict == 1 and truth == 1
        fp += verdict == 1 and truth == 0
        fn += verdict == 0 and truth == 1
        tn += verdict == 0 and truth == 0
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else (0.0 if fp + fn else None)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def read_experiments(path: Path, ids: Sequence[int] | None = None) -> list[LegacyExperiment]:
    """The legacy experiments of a database (all, or those of `ids`), with their recomputed metrics.

    Args:
        path: The R system's SQLite file.
        ids: Experiment ids to keep; None for all.

    Returns:
        One `LegacyExperiment` per experiment, in id order.

    Raises:
        ExperimentError: the file is no such database, or an id is not in it (one line).
    """
    con = _connect(path)
    try:
        experiments = _read_table(con, path, "experiments", _EXPERIMENT_COLUMNS, "ORDER BY experiment_id")
        results = _read_table(con, path, "narrative_results", _RESULT_COLUMNS)
    finally:
        con.close()
    known = [int(i) for i in experiments["experiment_id"]]
    unknown = sorted(set(ids or []) - set(known))
    if unknown:
        raise ExperimentError(
            f"{path}: no experiment {', '.join(map(str, unknown))} in table experiments "
            f"(it holds {', '.join(map(str, known)) or 'none'})"
        )
    out = []
    for info in _records(experiments):
        if ids and int(info["experiment_id"]) not in ids:
            continue
        rows = _with_keys(
            results[[_same_id(v, info["experiment_id"]) for v in results["experiment_id"]]], path, "narrative_results"
        )
        errors = sum(
            _flag(e) == 1 or _flag(d) is None for e, d in zip(rows["error_occurred"], rows["detected"], strict=True)
        )
        out.append(LegacyExperiment(info, len(rows), int(errors), answered_metrics(rows)))
    return out


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


def _same_id(value: Any, experiment_id: Any) -> bool:
    return _number(value) == _number(experiment_id)


def legacy_rows(path: Path, experiment_id: int) -> pd.DataFrame:
    """The `narrative_results` rows of one legacy experiment, keyed our way, newest last.

    Args:
        path: The R system's SQLite file.
        experiment_id: The legacy experiment.

    Returns:
        The rows with our `incident_id` / `narrative_type` and `legacy_text_hash`.
    """
    con = _connect(path)
    try:
        rows = _read_table(
            con,
            path,
            "narrative_results",
            _RESULT_COLUMNS,
            f"WHERE experiment_id = {int(experiment_id)} ORDER BY rowid",
        )
    finally:
        con.close()
    rows = _with_keys(rows, path, "narrative_results")
    rows["legacy_text_hash"] = [None if t is None else text_hash(str(t).strip()) for t in rows["narrative_text"]]
    return rows


def legacy_narratives(path: Path) -> pd.DataFrame:
    """The legacy corpus in our long layout: `source_narratives`, then texts only `narrative_results` holds.

    A key loaded twice keeps its newest load (`loaded_at`); labels missing there are taken
    from the results.

    Args:
        path: The R system's SQLite file.

    Returns:
        Columns `incident_id`, `narrative_type`, `narrative_text`, `manual_flag_ind`,
        `manual_flag`, one row per key, sorted by key.
    """
    con = _connect(path)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        source = (
            _read_table(con, path, "source_narratives", _SOURCE_COLUMNS, "ORDER BY loaded_at DESC, rowid DESC")
            if "source_narratives" in tables
            else pd.DataFrame(columns=[*_SOURCE_COLUMNS, "_rowid"])
        )
        results = _read_table(con, path, "narrative_results", _RESULT_COLUMNS, "ORDER BY processed_at DESC, rowid DESC")
    finally:
        con.close()
    source = _with_keys(source, path, "source_narratives")
    results = _with_keys(results[results["narrative_text"].notna()], path, "narrative_results")
    both = pd.concat([source.assign(_order=0), results.assign(_order=1)], ignore_index=True)
    # Source rows win over result rows; within a table the newest load wins.
    both = both.sort_values("_order", kind="stable").drop_duplicates(["incident_id", "narrative_type"], keep="first")
    labels = results.drop_duplicates(["incident_id", "narrative_type"], keep="first").set_index(
        ["incident_id", "narrative_type"]
    )
    out = both[["incident_id", "narrative_type", "narrative_text", "manual_flag_ind", "manual_flag"]].copy()
    for column in ("manual_flag_ind", "manual_flag"):
        fallback = [labels[column].get((i, t)) for i, t in zip(out["incident_id"], out["narrative_type"], strict=True)]
        out[column] = [
            _flag(v) if _flag(v) is not None else _flag(f) for v, f in zip(out[column], fallback, strict=True)
        ]
    out["narrative_text"] = [_text(t) for t in out["narrative_text"]]
    return out.sort_values(["incident_id", "narrative_type"]).reset_index(drop=True)


def write_narratives_csv(frame: pd.DataFrame, out: Path) -> Path:
    """Write the legacy corpus as a long-layout CSV (owner-only: it holds narrative text).

    Args:
        frame: `legacy_narratives(...)`.
        out: The CSV file.

    Returns:
        The path written.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["incident_id", "narrative_type", "narrative_text", "manual_flag_ind", "manual_flag"])
    for row in frame.itertuples(index=False):
        labels = ["" if _flag(v) is None else _flag(v) for v in (row.manual_flag_ind, row.manual_flag)]
        writer.writerow([row.incident_id, row.narrative_type, row.narrative_text, *labels])
    return write_private_bytes(out, buffer.getvalue().encode("utf-8"))


# --- prompts and names -------------------------------------------------------------------------

# The R templates' narrative placeholder: `{text}`, `{narrative}`, `{narrative_text}` (glue),
# doubled braces or `{{ ... }}` (mustache), any case.
_R_PLACEHOLDER = re.compile(r"\{\{?\s*(?:narrative_text|narrative|text)\s*\}?\}", re.IGNORECASE)


def convert_template(template: str) -> tuple[str, str | None]:
    """An R user template with its narrative placeholder turned into ours (`PLACEHOLDER`).

    Args:
        template: The R system's user template, verbatim.

    Returns:
        The converted template and a note when it could not be converted (else None).
    """
    if PLACEHOLDER in template:
        return template, None
    found = _R_PLACEHOLDER.findall(template)
    if len(found) == 1:
        return template.replace(found[0], PLACEHOLDER), None
    if not found:
        return template, f"the user template has no narrative placeholder; add {PLACEHOLDER} where the text goes"
    return template, f"the user template has {len(found)} narrative placeholders; keep one and make it {PLACEHOLDER}"


def slug(value: Any, fallback: str) -> str:
    """Letters, digits and `_` (a valid experiment name part), at most 40 characters.

    Args:
        value: Any text (a legacy experiment's name).
        fallback: Used when nothing is left.

    Returns:
        The slug, lower case.
    """
    text = re.sub(r"[^a-z0-9]+", "_", str(value or "").lower()).strip("_")[:40].strip("_")
    return text or fallback


def _base_url(url: Any) -> str | None:
    """An R `api_url` as our `base_url`: user and password cut out, `/chat/completions` dropped."""
    text = _text(url)
    if not text or not text.strip():
        return None
    parts = urlsplit(text.strip())
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    path = re.sub(r"/chat/completions/?$", "", parts.path)
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))


class _Literal(str):
    """A string dumped in YAML's block style, so prompt texts stay readable and verbatim."""


def _literal_representer(dumper: yaml.SafeDumper, value: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal_representer)


def _dump(document: dict[str, Any]) -> str:
    def block(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: block(v) for k, v in value.items()}
        return _Literal(value) if isinstance(value, str) and "\n" in value else value

    return yaml.dump(block(document), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def _comment(marker: str, lines: Iterable[str]) -> str:
    """The header of a written file: the marker line, then one comment line per note."""
    return marker + "\n" + "".join(f"# {' '.join(line.split())}\n" for line in lines)


# --- import ------------------------------------------------------------------------------------


def experiment_document(exp: LegacyExperiment, database: Path, sha256: str) -> tuple[str, dict[str, Any], list[str]]:
    """The experiment file of one legacy experiment: its name, its content and notes for the header.

    Args:
        exp: The legacy experiment.
        database: The database file (its absolute path is recorded).
        sha256: The database's sha256.

    Returns:
        `(name, document, notes)`.
    """
    info = exp.info
    name = f"legacy_{exp.experiment_id}_{slug(info.get('experiment_name'), 'experiment')}"
    template, problem = convert_template(_text(info.get("user_template")) or "")
    model: dict[str, Any] = {"name": _text(info.get("model_name")) or "unknown"}
    if _base_url(info.get("api_url")):
        model["base_url"] = _base_url(info.get("api_url"))
    if _number(info.get("temperature")) is not None:
        model["temperature"] = _number(info.get("temperature"))
    if _number(info.get("run_seed")) is not None:
        model["seed"] = int(_number(info.get("run_seed")) or 0)
    description = f"R system experiment {exp.experiment_id}: {_text(info.get('experiment_name')) or '(unnamed)'}"
    document = {
        "name": name,
        "description": description,
        "backend": "imported",
        "legacy": {"database": str(database.resolve()), "experiment_id": exp.experiment_id, "database_sha256": sha256},
        "model": model,
        "prompt": {
            "version": _text(info.get("prompt_version")) or "legacy",
            "system": _text(info.get("system_prompt")) or "",
            "user_template": template,
        },
    }
    notes = [f"{key}: {_text(info.get(key))}" for key in ("model_provider", "prompt_author", "data_file", "status")]
    notes = [n for n in notes if not n.endswith(": None")]
    if _text(info.get("notes")):
        notes.append("notes: " + (_text(info.get("notes")) or ""))
    notes += [problem] if problem else []
    return name, document, notes


def _experiment_file(folder: Path, name: str, document: dict[str, Any], header: list[str]) -> tuple[Path, str]:
    """The path and text of one imported experiment file, checked before anything is written.

    A file of that name is overwritten only when `import-legacy` wrote it from the same
    database file (a new version of the database re-imports); another file is left alone.
    """
    path = folder / f"{name}.yaml"
    legacy = document["legacy"]
    if path.exists():
        existing = path.read_text(encoding="utf-8", errors="replace")
        if not existing.startswith(IMPORT_MARKER):
            raise ExperimentError(
                f"{path}: exists and was not written by `narr import-legacy`; move it away to import experiment "
                f"{legacy['experiment_id']}"
            )
        before = _read_yaml(path).get("legacy") or {}
        if before.get("database") != legacy["database"]:
            raise ExperimentError(
                f"{path}: already imported from {before.get('database')}; move it away (or rename it and its "
                f"`name:`) to import experiment {legacy['experiment_id']} of {legacy['database']}"
            )
    text = _comment(IMPORT_MARKER, header) + _dump(document)
    if "${" in text:
        # `load_experiment` expands ${VAR} in every string: a prompt holding one would change.
        raise ExperimentError(f"{path}: the legacy prompt texts contain '${{', which experiment files expand; edit it")
    return path, text


@dataclass
class ImportResult:
    """What `import_legacy` wrote and found."""

    files: list[Path] = field(default_factory=list)
    experiments: list[LegacyExperiment] = field(default_factory=list)
    narratives: int = 0
    narratives_file: Path | None = None
    lines: list[str] = field(default_factory=list)


def import_legacy(
    database: Path, experiments_dir: Path, narratives_out: Path | None = None, ids: Sequence[int] | None = None
) -> ImportResult:
    """Write one `imported` experiment file per legacy experiment, and optionally the narratives CSV.

    Args:
        database: The R system's SQLite file.
        experiments_dir: Where experiment files go (`NARR_EXPERIMENTS`).
        narratives_out: Where to write the legacy narratives as a long-layout CSV, or None.
        ids: Legacy experiment ids to import; None for all.

    Returns:
        The files written and one line per experiment (rows, errors, stored vs recomputed F1).

    Raises:
        ExperimentError: the database cannot be read, or a file cannot be written (one line).
    """
    database = Path(database)
    experiments = read_experiments(database, ids)
    sha256 = file_sha256(database)
    result = ImportResult(experiments=experiments)
    planned = []
    for exp in experiments:  # every file checked before one is written
        name, document, notes = experiment_document(exp, database, sha256)
        header = [f"from {database.name}, experiment {exp.experiment_id}.", *notes]
        planned.append(_experiment_file(experiments_dir, name, document, header))
    if narratives_out is not None:
        corpus = legacy_narratives(database)
        result.narratives_file = write_narratives_csv(corpus, narratives_out)
        result.narratives = len(corpus)
    experiments_dir.mkdir(parents=True, exist_ok=True)
    for (path, text), exp in zip(planned, experiments, strict=True):
        path.write_text(text, encoding="utf-8")
        result.files.append(path)
        differences = exp.differences()
        f1 = exp.recomputed.get("f1")
        line = (
            f"{exp.n_rows:,} legacy rows ({exp.n_errors:,} error(s)); answered F1 "
            f"{'n/a' if f1 is None else f'{f1:.4f}'} "
        )
        line += (
            "equals the stored value" if not differences else "DIFFERS from the stored one: " + "; ".join(differences)
        )
        result.lines.append(line)
    return result


# --- classification of an imported experiment ------------------------------------------------


def database_path(cfg: ExperimentConfig) -> Path:
    """The database of an `imported` experiment; a relative path is relative to its file.

    Args:
        cfg: The experiment.

    Returns:
        The path.
    """
    assert cfg.legacy is not None  # validated with backend 'imported'
    path = Path(cfg.legacy.database)
    return path if path.is_absolute() else Path(cfg.source_file).parent / path


def _timestamp(value: Any) -> pd.Timestamp | None:
    text = _text(value)
    if not text:
        return None
    number = _number(text)
    try:
        stamp = pd.Timestamp(number, unit="s") if number is not None else pd.Timestamp(text)
    except (ValueError, OverflowError):
        return None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _indicators(value: Any) -> str:
    """Legacy indicators (JSON text: a list, or an object of flags) as our JSON list of names."""
    try:
        parsed = json.loads(_text(value) or "[]")
    except ValueError:
        return "[]"
    if isinstance(parsed, dict):
        parsed = [k for k, v in parsed.items() if v not in (False, 0, None, "", [])]
    if not isinstance(parsed, list):
        return "[]"
    return json.dumps([str(v) for v in parsed if v is not None], ensure_ascii=False)


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _legacy_status(legacy: dict[str, Any]) -> str:
    """`ok` for a verdict; `parse_error` for an answer the R system could not use; `rejected` for none."""
    if _flag(legacy.get("error_occurred")) != 1 and _flag(legacy.get("detected")) is not None:
        return OK
    return PARSE_ERROR if (_text(legacy.get("raw_response")) or "").strip() else REJECTED


def _row(
    cfg: ExperimentConfig, item: WorkItem, config_hash: str, legacy: dict[str, Any] | None, error: str | None
) -> dict[str, Any]:
    """One `classification_rows` row for `item` from its legacy row (None: none usable, see `error`)."""
    row = row_identity(cfg, item, config_hash, attempts=0 if legacy is None else 1, from_journal=False)
    row.update(model=cfg.model.name, answer_source="imported")
    if legacy is None or error is not None:
        row.update(status=REJECTED, error=error)
        return row
    status = _legacy_status(legacy)
    message = _text(legacy.get("error_message"))
    row.update(
        status=status,
        detected=bool(_flag(legacy.get("detected"))) if status == OK else None,
        confidence=_number(legacy.get("confidence")) if status == OK else None,
        indicators=_indicators(legacy.get("indicators")),
        rationale=_text(legacy.get("rationale")),
        # The R system's message may quote the narrative (a server echoing its input): cut it.
        error=None if status == OK else redact(message or "error in the legacy run (no message)", text=item.text),
        raw_content=_text(legacy.get("raw_response")),
        raw_reasoning=_text(legacy.get("reasoning_steps")),
        prompt_tokens=_int(legacy.get("prompt_tokens")),
        completion_tokens=_int(legacy.get("completion_tokens")),
        latency_s=_number(legacy.get("response_sec")),
        classified_at=_timestamp(legacy.get("processed_at")),
    )
    return row


@dataclass
class _Matches:
    """How the narratives of a run matched the legacy rows."""

    stale: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _match(
    cfg: ExperimentConfig, item: WorkItem, by_key: dict[tuple[str, str], list[dict[str, Any]]], found: _Matches
) -> tuple[dict[str, Any] | None, str | None]:
    """The legacy row for `item` (the newest of its key and text), or None and why not."""
    assert cfg.legacy is not None
    candidates = by_key.get((item.incident_id, item.narrative_type), [])
    where = f"legacy experiment {cfg.legacy.experiment_id} of {database_path(cfg).name}"
    if not candidates:
        found.missing.append(f"{item.incident_id}/{item.narrative_type}")
        return None, f"no answer: {where} has no row for this narrative"
    same_text = [c for c in candidates if c["legacy_text_hash"] in (None, item.text_hash)]
    if not same_text:
        found.stale.append(f"{item.incident_id}/{item.narrative_type}")
        verdict = _flag(candidates[-1].get("detected"))
        return None, (
            f"stale: {where} answered (detected={verdict}) a different text of this narrative; "
            "the text changed since, so the old verdict is not used"
        )
    return same_text[-1], None


def classify_imported(
    cfg: ExperimentConfig,
    items_by_batch: dict[str, list[WorkItem]],
    write_batches: Callable[[dict[str, pd.DataFrame]], None],
    log: Callable[[str], None] = lambda line: None,
) -> RunSummary:
    """The classification step of an `imported` experiment: legacy rows instead of a model.

    Args:
        cfg: The experiment (backend `imported`).
        items_by_batch: The narratives of the batches to write.
        write_batches: Writes `{batch_id: rows}` atomically (`Store.replace_partitions`).
        log: Where the stale and missing counts go (keys only, never text).

    Returns:
        The run summary (no calls, every batch written).

    Raises:
        ExperimentError: the database is gone or no longer the one imported (one line).
    """
    assert cfg.legacy is not None
    path = database_path(cfg)
    if not path.is_file():
        raise ExperimentError(f"{cfg.source_file}: legacy.database {path} not found; restore it or re-import")
    if file_sha256(path) != cfg.legacy.database_sha256:
        raise ExperimentError(
            f"{cfg.source_file}: legacy.database {path} changed since it was imported; "
            f"re-run `narr import-legacy {path}` to import it again"
        )
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in _records(legacy_rows(path, cfg.legacy.experiment_id)):
        by_key.setdefault((record["incident_id"], record["narrative_type"]), []).append(record)
    config_hash = cfg.config_hash
    summary = RunSummary(cfg.name, config_hash, batches=sorted(items_by_batch))
    started = time.monotonic()
    found = _Matches()
    frames = {}
    for batch_id, items in items_by_batch.items():
        rows = [_row(cfg, item, config_hash, *_match(cfg, item, by_key, found)) for item in items]
        for row in rows:
            summary.status_counts[row["status"]] = summary.status_counts.get(row["status"], 0) + 1
        summary.narratives += len(rows)
        frames[batch_id] = rows_frame(rows)
    write_batches(frames)
    summary.written_batches.extend(sorted(frames))
    summary.active_seconds = time.monotonic() - started
    for what, keys in (
        ("stale (text changed since the legacy run)", found.stale),
        ("without a legacy row", found.missing),
    ):
        if keys:
            log(
                f"{cfg.name}: {len(keys)} narrative(s) {what}, kept as status {REJECTED}: "
                f"{', '.join(keys[:_KEYS_SHOWN])}{' ...' if len(keys) > _KEYS_SHOWN else ''}"
            )
    return summary


# --- converting R experiment files ---------------------------------------------------------------

# R key -> our dotted key; everything else becomes a note in the converted file.
CONFIG_MAPPING = {
    "experiment.name": "name",
    "experiment.notes": "description",
    "model.name": "model.name",
    "model.api_url": "model.base_url",
    "model.temperature": "model.temperature",
    "prompt.version": "prompt.version",
    "prompt.system_prompt": "prompt.system",
    "prompt.user_template": "prompt.user_template",
    "run.seed": "model.seed",
}
# Where a provider listens when the R file gives no api_url (their documented defaults).
PROVIDER_URLS = {
    "ollama": "http://localhost:11434/v1",
    "lmstudio": "http://localhost:1234/v1",
    "lm_studio": "http://localhost:1234/v1",
    "openai": "https://api.openai.com/v1",
}
_SECRET_KEY = re.compile(r"(?i)(api_?key|token|secret|password)")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _set(document: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        document = document.setdefault(part, {})
    document[last] = value


def _unmapped_note(key: str, value: Any) -> str:
    if _SECRET_KEY.search(key):
        return f"{key}: not copied (a secret); put the key in an environment variable and name it in model.api_key_env"
    if key == "data.file":
        return f"data.file: {value} - set NARR_SOURCE to the narratives file instead"
    shown = " ".join(str(value).split())
    return f"{key}: {shown[:80]}{'...' if len(shown) > 80 else ''} - no equivalent here"


def convert_legacy_config(path: Path) -> tuple[str, str]:
    """One R system experiment YAML file as ours: the experiment's name and the file's text.

    Prompt texts are copied verbatim (the narrative placeholder made `PLACEHOLDER`),
    `api_url` becomes `base_url`, `run.seed` the model's seed; every other key is a comment
    at the top saying it does not map (secrets are never copied).

    Args:
        path: The R system's experiment file.

    Returns:
        `(name, text)`.

    Raises:
        ExperimentError: the file is not a readable YAML mapping (one line naming it).
    """
    flat = _flatten(_read_yaml(path))
    document: dict[str, Any] = {"backend": "openai"}
    notes: list[str] = []  # R keys with no equivalent here
    changed: list[str] = []  # values converted with a change worth checking
    for key, value in flat.items():
        if key in CONFIG_MAPPING and value is not None:
            _set(document, CONFIG_MAPPING[key], value)
        elif value is not None:
            notes.append(_unmapped_note(key, value))
    name = slug(document.get("name") or path.stem, "experiment")
    name = name if name[0].isalpha() else f"r_{name}"
    if document.get("name") != name:
        changed.append(f"experiment.name: {document.get('name')!r} became {name!r} (letters, digits and _ only)")
    document["name"] = name
    model = document.setdefault("model", {})
    if model.get("base_url"):
        model["base_url"] = _base_url(model["base_url"])
    elif str(flat.get("model.provider", "")).lower() in PROVIDER_URLS:
        model["base_url"] = PROVIDER_URLS[str(flat["model.provider"]).lower()]
        changed.append(f"model.base_url: none given; the default of provider {flat['model.provider']!r}")
    prompt = document.setdefault("prompt", {})
    if isinstance(prompt.get("user_template"), str):
        prompt["user_template"], problem = convert_template(prompt["user_template"])
        changed += [problem] if problem else []
    header = [
        f"from {path.name}.",
        *(f"Not mapped - {note}" for note in notes),
        *(f"Check - {change}" for change in changed),
    ]
    return name, _comment(CONVERT_MARKER, header) + _dump(document)

"""Experiments as configuration: one YAML file per experiment, validated with pydantic.

Naming rule: the file `configs/experiments/<name>.yaml` defines experiment `<name>` (or the
`name:` key when given; letters, digits and `_` only, since it becomes a Dagster key prefix).
Its assets are `<name>/classifications` (partitioned by batch) and `<name>/metrics`. A file
with a `grid:` (dotted config paths -> lists of values) defines one experiment per
combination instead, `<name>__<slug of the values>` (see `load_experiment_file`).

The *config hash* covers everything that can change a model's answer - backend, model name,
endpoint, sampling parameters, the resolved prompt texts, output mode, the lexicon for the
`rules` backend, whether placeholders are skipped - and nothing that cannot (concurrency,
timeouts, retries, API keys). It is the asset's code version and the journal key, so editing
a prompt re-asks the model and editing the concurrency does not.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from narr_assets import settings

PLACEHOLDER = "<<TEXT>>"

# Upper bounds of the run settings: past them a value is a typo or an attack, not a choice.
MAX_TOKENS = 262_144  # the largest context windows served today
MAX_CONCURRENCY = 1024
MAX_TIMEOUT_S = 3600.0  # one request; a slower answer is a hung server
# With backoff capped at 30 s, 20 retries wait out about ten minutes of outage; past that the
# batch fails and a resume picks it up, which is the better place to wait.
MAX_RETRIES = 20
MAX_REQUESTS_PER_MINUTE = 100_000.0
# Experiment and prompt files are small; a bigger one is a mistake (or /dev/zero's cousin).
MAX_FILE_BYTES = 1 << 20
# A YAML document may use anchors and aliases, but expanded it must stay this small: aliases
# are shared when parsed, and an "alias bomb" of ten lines expands to billions of nodes the
# moment anything walks it. Counting the expanded size on the parsed graph is linear in the
# file, so a bomb is refused at once while ordinary reuse of a block keeps working.
MAX_YAML_NODES = 10_000
MAX_YAML_CHARS = 2 * MAX_FILE_BYTES
MAX_YAML_DEPTH = 64
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ExperimentError(ValueError):
    """An experiment file is invalid; the message names the file and the field."""


class _Strict(BaseModel):
    # Subclasses give Field defaults as `default=`: type checkers see only that keyword, and
    # with a positional default they would take the field as required in `__init__`.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = "rules"
    base_url: str | None = None
    api_key_env: str | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, gt=0, le=MAX_TOKENS)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # what servers take
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)


class PromptSpec(_Strict):
    version: str = "v1"
    system: str | None = None
    system_file: str | None = None
    user_template: str | None = None
    user_template_file: str | None = None


class OutputSpec(_Strict):
    mode: Literal["json_schema", "json_object", "prompt"] = "json_schema"


class RunSpec(_Strict):
    concurrency: int = Field(default=8, ge=1, le=MAX_CONCURRENCY)
    timeout_s: float = Field(default=120.0, gt=0, le=MAX_TIMEOUT_S)
    max_retries: int = Field(default=6, ge=0, le=MAX_RETRIES)
    requests_per_minute: float | None = Field(default=None, gt=0, le=MAX_REQUESTS_PER_MINUTE)
    skip_placeholders: bool = True
    auto_materialize: bool = False
    max_error_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    # Narratives longer than this are not sent (a `rejected` row instead). Not in the config
    # hash, like timeout_s: it decides whether an answer is fetched, never what the answer is,
    # and hashing it would re-ask every narrative of the corpus when the limit changes.
    max_input_chars: int | None = Field(default=None, gt=0)


class LegacySpec(_Strict):
    """Where an `imported` experiment's answers live: one experiment of an R system database."""

    database: str
    experiment_id: int
    # The database file's sha256 when it was imported: in the config hash, so importing a
    # different database re-imports; classification refuses a file that no longer matches.
    database_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ExperimentConfig(_Strict):
    """The validated content of one experiment file, with prompts resolved to text."""

    name: str
    description: str = ""
    run_by_default: bool = False
    backend: Literal["openai", "rules", "imported"] = "openai"
    model: ModelSpec = Field(default_factory=ModelSpec)
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    lexicon: str | None = None
    legacy: LegacySpec | None = None  # backend `imported` only (see `narr_assets.legacy`)
    # Filled by load_experiment, not by users.
    source_file: str = ""
    system_prompt: str = ""
    user_template: str = ""
    lexicon_sha: str = ""
    # A grid member's grid (the file's `name:` or stem) and its values, by dotted path; empty
    # for an ordinary file. Not hashed: the values themselves are in the config they set.
    grid_name: str = ""
    grid_values: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must start with a letter and hold only letters, digits and '_'")
        return value

    @model_validator(mode="after")
    def _backend_needs(self) -> ExperimentConfig:
        if self.backend == "openai":
            if not self.model.base_url:
                raise ValueError("model.base_url is required for backend 'openai'")
            if PLACEHOLDER not in self.user_template:
                raise ValueError(f"the user template must contain the placeholder {PLACEHOLDER}")
            if self.user_template.count(PLACEHOLDER) != 1:
                raise ValueError(f"the user template must contain {PLACEHOLDER} exactly once")
        if (self.backend == "imported") != (self.legacy is not None):
            raise ValueError("backend 'imported' and the `legacy:` section go together (write both or neither)")
        return self

    @property
    def config_hash(self) -> str:
        """12-hex hash of everything that can change an answer (see module docstring)."""
        return hashlib.sha256(canonical_json(self.effective()).encode()).hexdigest()[:12]

    def effective(self) -> dict[str, Any]:
        """The answer-relevant configuration, as hashed and shown in the UI."""
        if self.backend == "rules":
            return {
                "backend": "rules",
                "lexicon_sha": self.lexicon_sha,
                "rules_version": _rules_version(),
                "skip_placeholders": self.run.skip_placeholders,
            }
        if self.backend == "imported" and self.legacy is not None:
            # The answers are the database's: which database and which of its experiments; the
            # model and prompts it recorded describe those answers (and the registry shows them).
            return {
                "backend": "imported",
                "legacy_database_sha256": self.legacy.database_sha256,
                "legacy_experiment_id": self.legacy.experiment_id,
                "model": self.model.model_dump(exclude={"api_key_env"}),
                "prompt_version": self.prompt.version,
                "system_prompt": self.system_prompt,
                "user_template": self.user_template,
            }
        model = self.model.model_dump(exclude={"api_key_env"})
        return {
            "backend": self.backend,
            "model": model,
            "prompt_version": self.prompt.version,
            "system_prompt": self.system_prompt,
            "user_template": self.user_template,
            "output_mode": self.output.mode,
            "skip_placeholders": self.run.skip_placeholders,
        }

    def registry_row(self) -> dict[str, Any]:
        """This config's row of the `experiment_registry` table (see `store.REGISTRY_COLUMNS`).

        Never a key: `api_key_env` is stored as the variable's name and its value is never
        read; user and password in `base_url` are cut out (the rest identifies the endpoint).
        A `rules` experiment asks no model: its model is `rules` and the sampling fields are null.

        Returns:
            Column -> value; `config` is the canonical JSON of `effective()`, the hashed fields
            (`base_url` without user and password).
        """
        asks = self.backend != "rules"
        model = self.model
        effective = self.effective()
        base_url = None
        if asks and model.base_url:
            parts = urlsplit(model.base_url)
            base_url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
            effective["model"]["base_url"] = base_url
        return {
            "experiment": self.name,
            "config_hash": self.config_hash,
            "backend": self.backend,
            "model": model.name if asks else "rules",
            "base_url": base_url,
            "api_key_env": model.api_key_env if asks else None,
            "temperature": model.temperature if asks else None,
            "seed": model.seed if asks else None,
            "max_tokens": model.max_tokens if asks else None,
            "reasoning_effort": model.reasoning_effort if asks else None,
            "prompt_version": self.prompt.version if asks else None,
            "system_prompt": self.system_prompt if asks else None,
            "user_template": self.user_template if asks else None,
            "output_mode": self.output.mode if asks else None,
            "source_file": self.source_file,
            "description": self.description,
            "config": canonical_json(effective),
        }

    @property
    def pool(self) -> str | None:
        """The Dagster pool of the experiment's classification step: its endpoint's, or None.

        `rules` experiments get none: they send no request, so there is no budget to share,
        and partition locks already keep two runs off the same batch.
        """
        return endpoint_pool(self.model.base_url) if self.backend == "openai" and self.model.base_url else None

    def api_key(self) -> str:
        """The API key from the environment variable named by `model.api_key_env`.

        Local servers need no key (a dummy is sent, as the SDK requires one); when a variable
        is named it must be set, so a missing key fails here and not as a 401 mid-run.
        """
        if not self.model.api_key_env:
            return "not-needed"
        value = os.environ.get(self.model.api_key_env)
        if not value:
            raise ExperimentError(
                f"{self.source_file}: model.api_key_env names {self.model.api_key_env}, "
                "which is not set in the environment"
            )
        return value


POOL_PREFIX = "narr-endpoint-"
_POOL_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_POOL_NAME = 200


def endpoint_pool(base_url: str) -> str:
    """The Dagster pool shared by every experiment that sends requests to `base_url`.

    `narr-endpoint-<host>-<port>-<path>`, e.g. `narr-endpoint-localhost-1234-v1` for
    `http://localhost:1234/v1/`: the host in lower case, the scheme's default port spelled
    out (so `https://api.openai.com/v1` and `https://api.openai.com:443/v1` share one
    budget), other characters than letters, digits, `.`, `_` and `-` replaced by `-`. Dagster
    accepts any name without whitespace; these few characters also survive the UI's pool URL
    (`/deployment/concurrency/<pool>`) and a shell unquoted. Two endpoints whose names collide
    after that replacement share a budget, which errs on the safe side.

    Args:
        base_url: The experiment's `model.base_url`.

    Returns:
        The pool name (at most 200 characters; a longer one ends in a hash of the URL).
    """
    parts = urlsplit(base_url.strip())
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:  # a port that is not a number: the URL's own spelling still tells them apart
        port = None
    # Without a host it is no URL the SDK could use; it still gets one pool per spelling.
    host = parts.hostname
    where = f"{host.lower()}-{port or ''}-{parts.path.strip('/')}" if host else base_url.strip()
    name = POOL_PREFIX + _POOL_UNSAFE.sub("-", where).strip("-")
    if len(name) > MAX_POOL_NAME:
        digest = hashlib.sha256(base_url.strip().encode()).hexdigest()[:12]
        name = f"{name[: MAX_POOL_NAME - 13]}-{digest}"
    return name


def _rules_version() -> str:
    from narr_assets.rules import RULES_VERSION

    return RULES_VERSION


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def expand_vars(value: Any, where: str) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string of a parsed YAML document."""
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            var, default = match.group(1), match.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise ExperimentError(f"{where}: environment variable {var} is not set (used as ${{{var}}})")

        return _VAR.sub(repl, value)
    if isinstance(value, dict):
        return {k: expand_vars(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, where) for v in value]
    return value


class _YamlTooBig(yaml.YAMLError):
    """A document that nests or expands past the limits (see `MAX_YAML_NODES`)."""


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses deep nesting, self-referring aliases and alias bombs."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # The composer recurses once per level: bound it before Python's stack does.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlTooBig(f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _check_expanded_size(node)
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expanded_size(root: yaml.Node) -> None:
    """Raise `_YamlTooBig` when `root`, with every alias written out, exceeds the limits.

    Aliases are shared nodes in the composed graph, so sizes are computed once per node
    (linear in the file) although they count every use; a node reachable from itself (an
    alias inside its own anchor) is refused, as nothing could walk it.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, scalar characters) expanded
    open_nodes: set[int] = set()  # nodes whose children are being sized: the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            nodes = 1 + sum(sizes[id(child)][0] for child in _children(node))
            chars = sum(sizes[id(child)][1] for child in _children(node))
            chars += len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            if nodes > MAX_YAML_NODES or chars > MAX_YAML_CHARS:
                what = f"{MAX_YAML_NODES:,} values" if nodes > MAX_YAML_NODES else f"{MAX_YAML_CHARS:,} characters"
                raise _YamlTooBig(
                    f"more than {what} once aliases are expanded; write the values out instead of nesting aliases"
                )
            sizes[key] = (nodes, chars)
        elif key in open_nodes:
            raise _YamlTooBig("an alias refers to a node that contains it")
        elif key not in sizes:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _read_small(path: Path, where: str) -> str:
    """The UTF-8 text of a regular file of at most `MAX_FILE_BYTES`.

    Opened without blocking and checked after opening, so a FIFO or device put in place of
    a file (or swapped in after a check) is refused instead of hanging the load.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ExperimentError(f"{where}: cannot read {path}: {exc.strerror}") from None
    subject = "the file" if where == str(path) else str(path)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ExperimentError(f"{where}: {subject} is not a regular file")
        data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ExperimentError(f"{where}: {subject} is larger than {MAX_FILE_BYTES:,} bytes; is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExperimentError(f"{where}: {subject} is not UTF-8 text (byte {exc.start})") from None


def prompt_folders(experiment_file: Path) -> list[Path]:
    """The folders prompt files may come from, resolved: the experiment file's, `configs/`, `NARR_PROMPT_DIRS`.

    Args:
        experiment_file: The experiment YAML file.

    Returns:
        The folders, in lookup order (sub-folders are allowed too).
    """
    folders = [experiment_file.parent, settings.PROJECT_ROOT / "configs", *settings.prompt_dirs()]
    return list(dict.fromkeys(folder.resolve() for folder in folders))


def _read_prompt(path: Path, field: str, given: str) -> str:
    """The text of a prompt file, which must resolve inside `prompt_folders(path)`.

    Prompt files are sent to the endpoint with every request, so a path that leaves the
    allowed folders (absolute, `..`, or a symlink pointing out) is refused before it is read:
    `system_file: /proc/self/environ` would otherwise ship the environment, keys included.
    """
    where = f"{path}: {field}"
    folders = prompt_folders(path)
    relative = Path(given)
    candidates = [relative] if relative.is_absolute() else [folder / relative for folder in folders]
    escaped = []
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
            raise ExperimentError(f"{where}: {given!r} is not a usable path ({exc})") from None
        if not any(resolved.is_relative_to(folder) for folder in folders):
            escaped.append(resolved)  # never read, whether it exists or not
        elif resolved.is_file():
            return _read_small(resolved, where)
    existing = [e for e in escaped if e.exists()]
    if existing or (escaped and len(escaped) == len(candidates)):
        raise ExperimentError(
            f"{where}: {given!r} resolves to {(existing or escaped)[0]}, outside the folders prompt files may "
            f"come from ({', '.join(map(str, folders))}); move it into one of them or add its folder to "
            "NARR_PROMPT_DIRS"
        )
    raise ExperimentError(f"{where}: file {given!r} not found (looked in {', '.join(map(str, folders))})")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A parser error as one line: where, then what."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid"
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what
    return " ".join(str(exc).split())


def _read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of an experiment file, within the size limits."""
    loader = _BoundedLoader(_read_small(path, str(path)))
    try:
        raw = loader.get_single_data()
    except _YamlTooBig as exc:
        raise ExperimentError(f"{path}: YAML refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of keys at the top level")
    return raw


def _format_validation(path: Path, err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(file)"
        problems.append(f"{loc}: {item['msg']}")
    return f"{path}: invalid experiment: {'; '.join(problems)}"


def _resolve_prompts(raw: dict[str, Any], path: Path) -> None:
    """Fill `system_prompt` and `user_template` from inline text or (confined) files."""
    prompt = raw.get("prompt") or {}
    if not isinstance(prompt, dict):
        return  # validation names prompt's type
    for text_key, file_key in (("system", "system_file"), ("user_template", "user_template_file")):
        if prompt.get(text_key) and prompt.get(file_key):
            raise ExperimentError(f"{path}: prompt.{text_key} and prompt.{file_key} are exclusive; give one")
    resolved = {}
    for text_key, file_key in (("system", "system_file"), ("user_template", "user_template_file")):
        given = prompt.get(file_key)
        if given and not isinstance(given, str):
            raise ExperimentError(f"{path}: prompt.{file_key}: expected a file path")
        resolved[text_key] = prompt.get(text_key) or (_read_prompt(path, f"prompt.{file_key}", given) if given else "")
    raw["system_prompt"], raw["user_template"] = resolved["system"], resolved["user_template"]


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Load, expand and validate one experiment file (not a grid: see `load_experiment_file`).

    Args:
        path: the YAML file.

    Returns:
        The validated config, with prompt files and the lexicon resolved.

    Raises:
        ExperimentError: naming the file and the offending field, on one line.
    """
    path = Path(path)
    raw = expand_vars(_read_yaml(path), str(path))
    if "grid" in raw:
        raise ExperimentError(f"{path}: declares a grid of experiments; load it with load_experiment_file")
    raw.setdefault("name", path.stem)
    return _validated(raw, path, "", {})


def _validated(raw: dict[str, Any], path: Path, grid_name: str, grid_values: dict[str, Any]) -> ExperimentConfig:
    """The config of one parsed document (a file, or a grid member): prompts and lexicon resolved."""
    _resolve_prompts(raw, path)
    raw["source_file"] = str(path)
    raw["grid_name"], raw["grid_values"] = grid_name, grid_values  # set here only, whatever the file says
    if raw.get("backend") == "rules":
        if not isinstance(raw.get("lexicon") or "", str):
            raise ExperimentError(f"{path}: lexicon: expected a file path")
        lexicon = Path(raw.get("lexicon") or settings.lexicon_path())
        if not lexicon.is_absolute():
            lexicon = settings.PROJECT_ROOT / lexicon
        if not lexicon.is_file():
            raise ExperimentError(f"{path}: lexicon: file {str(lexicon)!r} not found")
        raw["lexicon"] = str(lexicon)
        raw["lexicon_sha"] = hashlib.sha256(lexicon.read_bytes()).hexdigest()[:12]
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ExperimentError(_format_validation(path, exc)) from None


# Grids: `grid:` maps dotted config paths to lists of values; the file defines one experiment
# per combination, named `<name or stem>__<slug>__<slug>`. The bounds keep a typo from
# defining thousands of experiments (each one is a set of Dagster assets and a job).
MAX_GRID_MEMBERS = 64
MAX_NAME_CHARS = 100
_SLUG_PART_CHARS = 32
# Top-level fields a grid may not vary: the name is what the grid makes, the rest is filled
# by the loader.
_NOT_GRID_PATHS = {"name", "source_file", "system_prompt", "user_template", "lexicon_sha", "grid_name", "grid_values"}
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9]+")
_SHORT = {"temperature": "t"}


def load_experiment_file(path: str | Path) -> list[ExperimentConfig]:
    """The experiments of one file: its experiment, or one per combination of its `grid:`.

    Args:
        path: the YAML file.

    Returns:
        The validated configs, in the grid's order (the last path varies fastest).

    Raises:
        ExperimentError: naming the file and the grid path or member, on one line.
    """
    path = Path(path)
    raw = expand_vars(_read_yaml(path), str(path))
    if "grid" not in raw:
        return [load_experiment(path)]  # the one loader of a plain file (it reads the small file again)
    grid_name = raw.get("name", path.stem)
    members = []
    for name, values, member in _expand_grid(raw, path, str(grid_name)):
        try:
            members.append(_validated(member, path, str(grid_name), values))
        except ExperimentError as exc:
            detail = str(exc).removeprefix(f"{path}: ")
            raise ExperimentError(f"{path}: grid member {name} ({format_grid_values(values)}): {detail}") from None
    return members


def _expand_grid(raw: dict[str, Any], path: Path, prefix: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(member name, grid values, member document) for each combination of `raw`'s `grid:`."""
    grid = raw.pop("grid")
    if not isinstance(grid, dict) or not grid:
        raise ExperimentError(
            f"{path}: grid: expected a mapping of dotted config paths to lists of values "
            "(e.g. `model.temperature: [0.0, 0.2]`)"
        )
    axes = []
    for key, values in grid.items():
        _check_grid_path(key, path)
        if not isinstance(values, list) or not values:
            got = "an empty list" if isinstance(values, list) else f"a {type(values).__name__}"
            raise ExperimentError(f"{path}: grid.{key}: expected a non-empty list of values, got {got}")
        axes.append((key, values, _grid_slugs(key, values, path)))
    for key, _, _ in axes:
        inner = [other for other, _, _ in axes if other.startswith(f"{key}.")]
        if inner:
            raise ExperimentError(f"{path}: grid.{inner[0]}: overlaps grid.{key}; vary one or the other")
    count = math.prod(len(values) for _, values, _ in axes)
    if count > MAX_GRID_MEMBERS:
        sizes = " x ".join(str(len(values)) for _, values, _ in axes)
        raise ExperimentError(
            f"{path}: grid: {sizes} = {count} combinations, more than {MAX_GRID_MEMBERS} experiments per file; "
            "split it into several files"
        )
    members = []
    for combo in itertools.product(*(range(len(values)) for _, values, _ in axes)):
        name = "__".join([prefix, *(slugs[i] for (_, _, slugs), i in zip(axes, combo, strict=True))])
        if len(name) > MAX_NAME_CHARS:
            raise ExperimentError(
                f"{path}: grid: member name {name[:40]}... is {len(name)} characters, over {MAX_NAME_CHARS}; "
                "shorten the file name (or `name:`) or the values"
            )
        values = {key: vals[i] for (key, vals, _), i in zip(axes, combo, strict=True)}
        member = copy.deepcopy(raw)
        for key, value in values.items():
            _set_path(member, key, value, path)
        member["name"] = name
        members.append((name, values, member))
    return members


def _check_grid_path(key: Any, path: Path) -> None:
    """Refuse a grid key that is not the dotted path of a field users may set."""
    if not isinstance(key, str):
        raise ExperimentError(f"{path}: grid: key {key!r} is not a dotted config path such as model.temperature")
    model: type[BaseModel] = ExperimentConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = {n: f for n, f in model.model_fields.items() if depth or n not in _NOT_GRID_PATHS}
        if part not in fields:
            where = ".".join(parts[:depth]) or "an experiment"
            raise ExperimentError(
                f"{path}: grid.{key}: unknown config path ({where} has no field {part!r} a grid may vary; "
                f"fields: {', '.join(fields)})"
            )
        annotation = fields[part].annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ExperimentError(
                    f"{path}: grid.{key}: {'.'.join(parts[: depth + 1])} is one value; vary it as a whole"
                )
            model = annotation


def _set_path(doc: dict[str, Any], key: str, value: Any, path: Path) -> None:
    """Set `doc`'s value at the dotted `key` (replacing it whole), creating missing mappings."""
    *parents, last = key.split(".")
    node = doc
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ExperimentError(f"{path}: grid.{key}: {where} in the file is not a mapping")
        node = child
    node[last] = copy.deepcopy(value)


def _grid_slugs(key: str, values: list[Any], path: Path) -> list[str]:
    """The name part of each value of one grid path; two values with the same part are refused."""
    field = key.rsplit(".", 1)[-1]
    slugs = [_grid_slug(field, value, index) for index, value in enumerate(values, 1)]
    first: dict[str, int] = {}
    for index, slug in enumerate(slugs):
        if slug in first:
            earlier = first[slug]
            raise ExperimentError(
                f"{path}: grid.{key}: {_shown(values[earlier], earlier + 1)} and {_shown(values[index], index + 1)} "
                f"both make the name part {slug!r}; make them differ in letters or digits"
                + (" (a prompt is named by its `version`)" if isinstance(values[index], dict) else "")
            )
        first[slug] = index
    return slugs


def _grid_slug(field: str, value: Any, index: int) -> str:
    """`t0_2` for temperature 0.2, a model name sanitized, a prompt by its `version` (else `prompt2`)."""
    short = _SHORT.get(field, field)
    version = value.get("version") if isinstance(value, dict) else None
    if isinstance(value, bool):
        token = field if value else f"no_{field}"
    elif isinstance(value, int | float):
        token = f"{short}{value}"
    elif isinstance(value, str):
        token = value if field in ("name", "version") else f"{short}_{value}"
    elif isinstance(version, str | int | float) and not isinstance(version, bool):
        token = str(version)
    elif value is None:
        token = f"{short}_none"
    else:
        token = f"{field}{index}"
    token = _SLUG_UNSAFE.sub("_", token).strip("_") or f"{field}{index}"
    if len(token) > _SLUG_PART_CHARS:  # cut, with a digest of the value so cut names stay apart
        digest = hashlib.sha256(canonical_json(value).encode()).hexdigest()[:8]
        token = f"{token[: _SLUG_PART_CHARS - 9].rstrip('_')}_{digest}"
    return token


def _shown(value: Any, index: int) -> str:
    """A grid value in a message: a short scalar as written, a mapping or list by its position."""
    if isinstance(value, dict | list):
        return f"item {index}"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else f"{text[:37]}..."


def format_grid_values(values: dict[str, Any]) -> str:
    """A grid member's values on one line, e.g. `model.temperature=0.2, prompt={version: v1}`.

    Args:
        values: `ExperimentConfig.grid_values`.

    Returns:
        The values, each as `path=value`; a mapping shows its `version` (or its keys).
    """
    parts = []
    for key, value in values.items():
        if isinstance(value, dict):
            shown = f"{{version: {value['version']}}}" if "version" in value else "{" + ", ".join(map(str, value)) + "}"
        elif isinstance(value, list):
            shown = f"[{len(value)} values]"
        else:
            shown = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"{key}={shown}")
    return ", ".join(parts)


@dataclass(frozen=True)
class BrokenExperiment:
    """An experiment file that could not be used, and why (one line naming the file)."""

    path: Path
    name: str  # the experiment it would define: the file name, or the duplicated `name:`
    message: str


class Experiments(list[ExperimentConfig]):
    """The valid experiments of a folder, in file order; `errors` lists the files left out."""

    def __init__(self, configs: list[ExperimentConfig], errors: list[BrokenExperiment]) -> None:
        super().__init__(configs)
        self.errors = errors


def load_experiments(folder: str | Path | None = None) -> Experiments:
    """Load every `*.yaml`/`*.yml` file of a folder, sorted by name; one bad file spoils no other.

    A grid file gives each of its members (`load_experiment_file`); a grid with one bad
    member is left out whole, as any file that fails to load.

    A file that fails to load, and every file of a name defined twice (neither silently
    wins), is left out and reported in `errors`; the other experiments are returned.

    Args:
        folder: The folder; `NARR_EXPERIMENTS` when omitted.

    Returns:
        The valid configs (a list) with `.errors`, one `BrokenExperiment` per file left out.

    Raises:
        ExperimentError: when the folder itself does not exist.
    """
    folder = Path(folder) if folder else settings.experiments_dir()
    if not folder.is_dir():
        raise ExperimentError(f"{folder}: experiments folder not found (set NARR_EXPERIMENTS)")
    configs: list[ExperimentConfig] = []
    errors: list[BrokenExperiment] = []
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            configs.extend(load_experiment_file(path))
        except ExperimentError as exc:
            errors.append(BrokenExperiment(path, path.stem, str(exc)))
        except Exception as exc:  # a case the checks above missed: still this file's problem only
            message = f"{path}: cannot be loaded ({type(exc).__name__}: {exc}); please report this file's shape"
            errors.append(BrokenExperiment(path, path.stem, " ".join(message.split())))
    files_by_name: dict[str, list[str]] = {}
    for cfg in configs:
        files_by_name.setdefault(cfg.name, []).append(cfg.source_file)
    for cfg in configs:
        others = [f for f in files_by_name[cfg.name] if f != cfg.source_file]
        if others:
            message = (
                f"{cfg.source_file}: experiment name {cfg.name!r} is also defined by {', '.join(others)}; "
                "rename one (set `name:` or rename the file)"
            )
            errors.append(BrokenExperiment(Path(cfg.source_file), cfg.name, message))
    valid = [cfg for cfg in configs if len(files_by_name[cfg.name]) == 1]
    return Experiments(valid, sorted(errors, key=lambda e: str(e.path)))


def build_messages(cfg: ExperimentConfig, text: str) -> list[dict[str, str]]:
    """Chat messages for one narrative: the system prompt and the filled user template."""
    messages = []
    if cfg.system_prompt:
        system = cfg.system_prompt
        if cfg.model.reasoning_effort and not system.lstrip().lower().startswith("reasoning:"):
            # gpt-oss reads its reasoning effort from the first line of the system prompt.
            system = f"Reasoning: {cfg.model.reasoning_effort}\n{system}"
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": cfg.user_template.replace(PLACEHOLDER, text)})
    return messages

"""Experiments as configuration: one YAML file per experiment, validated with pydantic.

Naming rule: the file `configs/experiments/<name>.yaml` defines experiment `<name>` (or the
`name:` key when given; letters, digits and `_` only, since it becomes a Dagster key prefix).
Its assets are `<name>/classifications` (partitioned by batch) and `<name>/metrics`.

The *config hash* covers everything that can change a model's answer - backend, model name,
endpoint, sampling parameters, the resolved prompt texts, output mode, the lexicon for the
`rules` backend, whether placeholders are skipped - and nothing that cannot (concurrency,
timeouts, retries, API keys). It is the asset's code version and the journal key, so editing
a prompt re-asks the model and editing the concurrency does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from narr_assets import settings

PLACEHOLDER = "<<TEXT>>"
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
    max_tokens: int | None = Field(default=None, gt=0)
    seed: int | None = None
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
    concurrency: int = Field(default=8, ge=1, le=1024)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=6, ge=0, le=100)
    requests_per_minute: float | None = Field(default=None, gt=0)
    skip_placeholders: bool = True
    auto_materialize: bool = False
    max_error_rate: float = Field(default=0.05, ge=0.0, le=1.0)


class ExperimentConfig(_Strict):
    """The validated content of one experiment file, with prompts resolved to text."""

    name: str
    description: str = ""
    run_by_default: bool = False
    backend: Literal["openai", "rules"] = "openai"
    model: ModelSpec = Field(default_factory=ModelSpec)
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    lexicon: str | None = None
    # Filled by load_experiment, not by users.
    source_file: str = ""
    system_prompt: str = ""
    user_template: str = ""
    lexicon_sha: str = ""

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


def _read_text(base: Path, relative: str, where: str) -> str:
    path = Path(relative)
    candidates = [path] if path.is_absolute() else [base / path, settings.PROJECT_ROOT / "configs" / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise ExperimentError(
        f"{where}: file {relative!r} not found (looked in {', '.join(str(c.parent) for c in candidates)})"
    )


def _format_validation(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid experiment"]
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(file)"
        lines.append(f"  {loc}: {item['msg']}")
    return "\n".join(lines)


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Load, expand and validate one experiment file.

    Args:
        path: the YAML file.

    Returns:
        The validated config, with prompt files and the lexicon resolved.

    Raises:
        ExperimentError: naming the file and the offending field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise ExperimentError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of keys at the top level")
    raw = expand_vars(raw, str(path))
    raw.setdefault("name", path.stem)
    prompt = raw.get("prompt") or {}
    if isinstance(prompt, dict):
        for text_key, file_key in (("system", "system_file"), ("user_template", "user_template_file")):
            if prompt.get(text_key) and prompt.get(file_key):
                raise ExperimentError(f"{path}: prompt.{text_key} and prompt.{file_key} are exclusive; give one")
        system = prompt.get("system") or (
            _read_text(path.parent, prompt["system_file"], f"{path}: prompt.system_file")
            if prompt.get("system_file")
            else ""
        )
        template = prompt.get("user_template") or (
            _read_text(path.parent, prompt["user_template_file"], f"{path}: prompt.user_template_file")
            if prompt.get("user_template_file")
            else ""
        )
        raw["system_prompt"], raw["user_template"] = system, template
    raw["source_file"] = str(path)
    if raw.get("backend") == "rules":
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


def load_experiments(folder: str | Path | None = None) -> list[ExperimentConfig]:
    """Load every `*.yaml`/`*.yml` file of a folder, sorted by name; names must be unique."""
    folder = Path(folder) if folder else settings.experiments_dir()
    if not folder.is_dir():
        raise ExperimentError(f"{folder}: experiments folder not found (set NARR_EXPERIMENTS)")
    configs = [load_experiment(p) for p in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])]
    seen: dict[str, str] = {}
    for cfg in configs:
        if cfg.name in seen:
            raise ExperimentError(
                f"{cfg.source_file}: experiment name {cfg.name!r} is already used by {seen[cfg.name]}"
            )
        seen[cfg.name] = cfg.source_file
    return configs


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

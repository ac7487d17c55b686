"""Experiment files: validation with errors naming file and field, hashing, prompts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from narr_assets.experiments import (
    MAX_FILE_BYTES,
    PLACEHOLDER,
    ExperimentError,
    build_messages,
    load_experiment,
    load_experiments,
)

ROOT = Path(__file__).resolve().parent.parent

LLM = """
backend: openai
model:
  name: test-model
  base_url: http://127.0.0.1:9/v1
  temperature: 0.2
prompt:
  version: v1
  system: You classify narratives.
  user_template: "Narrative: <<TEXT>>"
run:
  concurrency: 4
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_shipped_experiments_load_and_only_rules_runs_by_default():
    configs = load_experiments(ROOT / "configs" / "experiments")
    names = {c.name for c in configs}
    assert {"rules", "llm_baseline", "llm_indicators", "llm_strict", "llm_context"} <= names
    assert [c.name for c in configs if c.run_by_default] == ["rules"]
    for cfg in configs:
        if cfg.backend == "openai":
            assert cfg.user_template.count(PLACEHOLDER) == 1
            assert "IPV" in cfg.system_prompt
    # Four prompt families, four different answers-relevant configurations.
    assert len({c.config_hash for c in configs}) == len(configs)


def test_name_defaults_to_file_stem(tmp_path):
    assert load_experiment(write(tmp_path, "my_exp", LLM)).name == "my_exp"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LLM.replace("temperature: 0.2", "temperature: hot"), "model.temperature"),
        (LLM.replace("concurrency: 4", "concurrency: 0"), "run.concurrency"),
        (LLM.replace("base_url: http://127.0.0.1:9/v1", "base_url: ''"), "model.base_url is required"),
        (LLM.replace("<<TEXT>>", "{text}"), "placeholder <<TEXT>>"),
        (LLM.replace("<<TEXT>>", "<<TEXT>> <<TEXT>>"), "exactly once"),
        (LLM + "\nunknown_key: 1\n", "unknown_key"),
        (LLM.replace("backend: openai", "backend: claude"), "backend"),
        ("- a\n- list\n", "mapping"),
        ("backend: [unclosed\n", "not valid YAML: line 2, column 1"),
        # Upper bounds: past them a value is a typo or an attack, never a setting.
        (LLM.replace("temperature: 0.2", "temperature: 0.2\n  max_tokens: 1000000000000"), "model.max_tokens"),
        (LLM.replace("temperature: 0.2", "temperature: 0.2\n  seed: 100000000000000000000"), "model.seed"),
        (LLM.replace("concurrency: 4", "concurrency: 1025"), "run.concurrency"),
        (LLM + "  timeout_s: 3601\n", "run.timeout_s: Input should be less than or equal to 3600"),
        (LLM + "  max_retries: 21\n", "run.max_retries: Input should be less than or equal to 20"),
        (LLM + "  requests_per_minute: 1e9\n", "run.requests_per_minute"),
        # Two problems, one line: both named.
        (LLM.replace("concurrency: 4", "concurrency: 0\n  timeout_s: -1"), "run.concurrency: Input should be"),
    ],
)
def test_invalid_files_name_file_and_field(tmp_path, text, expected):
    path = write(tmp_path, "bad", text)
    with pytest.raises(ExperimentError) as err:
        load_experiment(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)  # one line, as the CLI prints it


def test_bounds_accept_their_limits(tmp_path):
    text = LLM.replace("temperature: 0.2", "temperature: 0.2\n  max_tokens: 262144").replace(
        "concurrency: 4", "concurrency: 1024\n  timeout_s: 3600\n  max_retries: 20\n  requests_per_minute: 100000"
    )
    cfg = load_experiment(write(tmp_path, "edge", text))
    assert (cfg.model.max_tokens, cfg.run.concurrency, cfg.run.timeout_s, cfg.run.max_retries) == (
        262144,
        1024,
        3600,
        20,
    )


def test_env_expansion_and_missing_variable(tmp_path, monkeypatch):
    text = LLM.replace("name: test-model", "name: ${NARR_TEST_MODEL}")
    monkeypatch.setenv("NARR_TEST_MODEL", "from-env")
    assert load_experiment(write(tmp_path, "e", text)).model.name == "from-env"
    monkeypatch.delenv("NARR_TEST_MODEL")
    with pytest.raises(ExperimentError, match="NARR_TEST_MODEL is not set"):
        load_experiment(write(tmp_path, "e", text))
    default = LLM.replace("name: test-model", "name: ${NARR_TEST_MODEL:-fallback}")
    assert load_experiment(write(tmp_path, "e", default)).model.name == "fallback"


def test_config_hash_tracks_answer_relevant_fields_only(tmp_path):
    base = load_experiment(write(tmp_path, "a", LLM)).config_hash
    assert load_experiment(write(tmp_path, "a", LLM)).config_hash == base  # stable
    same = LLM.replace("concurrency: 4", "concurrency: 32") + "  timeout_s: 5\n"
    assert load_experiment(write(tmp_path, "a", same)).config_hash == base
    for changed in (
        LLM.replace("You classify narratives.", "You classify narratives carefully."),
        LLM.replace("temperature: 0.2", "temperature: 0.3"),
        LLM.replace("name: test-model", "name: other-model"),
        LLM + "output:\n  mode: prompt\n",
    ):
        assert load_experiment(write(tmp_path, "a", changed)).config_hash != base


def test_api_key_is_read_from_named_variable_and_never_hashed(tmp_path, monkeypatch):
    text = LLM.replace("temperature: 0.2", "temperature: 0.2\n  api_key_env: NARR_TEST_KEY")
    cfg = load_experiment(write(tmp_path, "k", text))
    monkeypatch.delenv("NARR_TEST_KEY", raising=False)
    with pytest.raises(ExperimentError, match="NARR_TEST_KEY, which is not set"):
        cfg.api_key()
    monkeypatch.setenv("NARR_TEST_KEY", "sk-secret-value")
    assert cfg.api_key() == "sk-secret-value"
    assert "sk-secret-value" not in repr(cfg.effective())
    assert "NARR_TEST_KEY" not in repr(cfg.effective())


def test_prompt_files_resolve_relative_to_configs(tmp_path):
    text = LLM.replace(
        '  system: You classify narratives.\n  user_template: "Narrative: <<TEXT>>"',
        "  system_file: prompts/strict.md\n  user_template_file: prompts/user_template.md",
    )
    cfg = load_experiment(write(tmp_path, "f", text))
    assert cfg.system_prompt == (ROOT / "configs/prompts/strict.md").read_text()
    missing = text.replace("prompts/strict.md", "prompts/nope.md")
    with pytest.raises(ExperimentError, match=r"prompts/nope\.md"):
        load_experiment(write(tmp_path, "f", missing))


def test_build_messages_fills_placeholder_and_reasoning_line(tmp_path):
    cfg = load_experiment(
        write(tmp_path, "m", LLM.replace("temperature: 0.2", "temperature: 0.2\n  reasoning_effort: high"))
    )
    messages = build_messages(cfg, "V was found.")
    assert messages[0] == {"role": "system", "content": "Reasoning: high\nYou classify narratives."}
    assert messages[1] == {"role": "user", "content": "Narrative: V was found."}


def test_duplicate_names_report_both_files_and_neither_wins(tmp_path):
    one = write(tmp_path, "one", "name: same\n" + LLM)
    two = write(tmp_path, "two", "name: same\n" + LLM)
    write(tmp_path, "other", LLM)
    loaded = load_experiments(tmp_path)
    assert [c.name for c in loaded] == ["other"]
    assert [(e.path, e.name) for e in loaded.errors] == [(one, "same"), (two, "same")]
    assert str(two) in loaded.errors[0].message and str(one) in loaded.errors[1].message
    assert "'same' is also defined by" in loaded.errors[0].message


# --- prompt files stay inside the allowed folders --------------------------------------

SECRET = "OPENAI_API_KEY=sk-do-not-send"


@pytest.fixture
def outside(tmp_path):
    """An experiment folder, and a secret file next to it (outside it)."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.md").write_text(SECRET)
    return tmp_path


def with_system_file(given: str) -> str:
    return LLM.replace("  system: You classify narratives.", f"  system_file: {given}")


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "proc"])
def test_prompt_file_outside_the_allowed_folders_is_refused(outside, kind):
    secret = outside / "elsewhere" / "secret.md"
    given = {
        "absolute": str(secret),
        "dotdot": "../elsewhere/secret.md",
        "symlink": "link.md",
        "proc": "/proc/self/environ",  # the reported leak: the whole environment, keys included
    }[kind]
    (outside / "exp" / "link.md").symlink_to(secret)
    path = write(outside / "exp", "leak", with_system_file(given))
    with pytest.raises(ExperimentError) as err:
        load_experiment(path)
    message = str(err.value)
    assert message.startswith(f"{path}: prompt.system_file: {given!r} resolves to ")
    assert "outside the folders prompt files may come from" in message and "NARR_PROMPT_DIRS" in message
    assert SECRET not in message and "\n" not in message


def test_missing_prompt_file_outside_is_refused_not_looked_for(outside):
    path = write(outside / "exp", "leak", with_system_file("../../../../../../nowhere/x.md"))
    with pytest.raises(ExperimentError, match=r"resolves to /nowhere/x\.md, outside"):
        load_experiment(path)


def test_prompt_files_inside_the_experiment_folder_are_read(outside):
    (outside / "exp" / "prompts").mkdir()
    (outside / "exp" / "prompts" / "p.md").write_text("Own prompt.")
    (outside / "exp" / "alias.md").symlink_to(outside / "exp" / "prompts" / "p.md")  # a link that stays inside
    for given in ("prompts/p.md", "prompts/../prompts/p.md", "alias.md", str(outside / "exp" / "prompts" / "p.md")):
        cfg = load_experiment(write(outside / "exp", "own", with_system_file(given)))
        assert cfg.system_prompt == "Own prompt.", given


def test_prompt_dirs_setting_allows_more_folders(outside, monkeypatch):
    other = outside / "other"
    other.mkdir()
    monkeypatch.setenv("NARR_PROMPT_DIRS", os.pathsep.join([str(other), str(outside / "elsewhere")]))
    secret = outside / "elsewhere" / "secret.md"
    for given in (str(secret), "../elsewhere/secret.md", "secret.md"):  # absolute, relative, found by name
        cfg = load_experiment(write(outside / "exp", "allowed", with_system_file(given)))
        assert cfg.system_prompt == SECRET, given
    monkeypatch.setenv("NARR_PROMPT_DIRS", str(other))
    with pytest.raises(ExperimentError, match="outside"):
        load_experiment(write(outside / "exp", "allowed", with_system_file(str(secret))))


@pytest.mark.reliability
def test_prompt_and_experiment_files_must_be_small_regular_files(outside):
    (outside / "exp" / "big.md").write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    with pytest.raises(ExperimentError, match=r"big\.md is larger than 1,048,576 bytes"):
        load_experiment(write(outside / "exp", "big", with_system_file("big.md")))
    fifo = outside / "exp" / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would wait forever for a writer
    started = time.perf_counter()
    loaded = load_experiments(outside / "exp")
    assert time.perf_counter() - started < 2
    assert any(e.path == fifo and "is not a regular file" in e.message for e in loaded.errors)


# --- YAML that would hang whoever walks it -----------------------------------------------

ALIAS_BOMB = (
    "".join(
        f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
        for prev, name in zip([None, *"abcdefgh"], "abcdefghi", strict=True)
    )
    + "backend: rules\n"
)


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ALIAS_BOMB, "more than 10,000 values"),  # 9**9 (387 million) strings once expanded
        ("a: &a [*a]\nbackend: rules\n", "an alias refers to a node that contains it"),
        ("x: " + "[" * 100_000 + "\n", "nested deeper than 64 levels"),
        ("s: &s '" + "x" * 500_000 + "'\nl: [*s, *s, *s, *s, *s]\n", "2,097,152 characters"),
    ],
    ids=["alias_bomb", "self_alias", "deep", "long_aliased_string"],
)
def test_expanding_yaml_is_refused_at_once(tmp_path, text, expected):
    path = write(tmp_path, "bomb", text)
    started = time.perf_counter()
    with pytest.raises(ExperimentError) as err:
        load_experiment(path)
    assert time.perf_counter() - started < 2  # generous for a busy machine: it takes milliseconds
    assert str(err.value).startswith(f"{path}: YAML refused: ") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_ordinary_aliases_still_work(tmp_path):
    text = LLM.replace("temperature: 0.2", "temperature: 0.2\n  extra_body: {a: &opts {top_k: 5}, b: *opts}")
    assert load_experiment(write(tmp_path, "ok", text)).model.extra_body == {"a": {"top_k": 5}, "b": {"top_k": 5}}


# --- one broken file spoils no other ----------------------------------------------------


def test_a_broken_file_is_reported_and_the_others_load(tmp_path):
    write(tmp_path, "good", LLM)
    bad = write(tmp_path, "bad", LLM.replace("concurrency: 4", "concurrency: 0"))
    bomb = write(tmp_path, "bomb", ALIAS_BOMB)
    loaded = load_experiments(tmp_path)
    assert [c.name for c in loaded] == ["good"]
    assert [(e.path, e.name) for e in loaded.errors] == [(bad, "bad"), (bomb, "bomb")]
    assert loaded.errors[0].message.startswith(f"{bad}: invalid experiment: run.concurrency")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backend: rules\nlexicon: [a]\n", "lexicon: expected a file path"),
        ('backend: openai\nmodel: {base_url: x}\nprompt: {system_file: "a\\0b"}\n', "is not a usable path"),
        ("backend: rules\n\xff\n", "the file is not UTF-8 text (byte 15)"),
    ],
    ids=["lexicon_not_a_path", "nul_in_path", "not_utf8"],
)
def test_odd_shapes_are_named_errors_not_crashes(tmp_path, text, expected):
    path = tmp_path / "odd.yaml"
    path.write_bytes(text.encode("latin-1"))
    (error,) = load_experiments(tmp_path).errors
    assert error.message.startswith(f"{path}: ") and expected in error.message


def test_an_unforeseen_failure_spoils_only_its_file(tmp_path, monkeypatch):
    import narr_assets.experiments as experiments

    write(tmp_path, "good", LLM)
    odd = write(tmp_path, "odd", LLM)
    real = experiments.load_experiment

    def load(path):
        if Path(path) == odd:
            raise TypeError("unhashable type: 'dict'")  # stands in for a bug a file shape could trigger
        return real(path)

    monkeypatch.setattr(experiments, "load_experiment", load)
    loaded = load_experiments(tmp_path)
    assert [c.name for c in loaded] == ["good"]
    assert loaded.errors[0].message.startswith(f"{odd}: cannot be loaded (TypeError: unhashable type: 'dict')")


def test_definitions_build_the_valid_experiments_and_name_the_broken_file(project, caplog):
    import dagster as dg

    from narr_assets.definitions import defs

    bad = project / "experiments" / "broken.yaml"
    bad.write_text("backend: openai\nmodel:\n  temperature: 9\n")
    with caplog.at_level("WARNING"):
        loaded = defs()
    keys = {k.to_user_string() for k in loaded.resolve_all_asset_keys()}
    assert {"rules/classifications", "rules/metrics", "leaderboard"} <= keys
    assert not any(k.startswith("broken/") for k in keys)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"experiment file left out: {bad}: invalid experiment: model" in w for w in warnings)
    leaderboard = loaded.get_assets_def(dg.AssetKey("leaderboard"))
    assert f"Left out, invalid experiment file: {bad}" in leaderboard.descriptions_by_key[dg.AssetKey("leaderboard")]


@pytest.mark.reliability
def test_narr_cli_runs_good_experiments_while_another_file_is_broken(project):
    """The real `narr`: a broken file is named, never in the way of the others."""
    env = {k: v for k, v in os.environ.items()}
    bad = project / "experiments" / "bad.yaml"
    bad.write_text(ALIAS_BOMB)
    narr = str(Path(sys.executable).parent / "narr")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([narr, *args], env=env, capture_output=True, text=True, timeout=300)

    listed = run("experiments")
    assert listed.returncode == 1  # a broken file fails a scripted check
    assert "rules " in listed.stdout and f"bad                      INVALID  {bad}: YAML refused" in listed.stdout
    refused = run("run", "bad")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"narr: {bad}: YAML refused: more than 10,000 values once aliases are expanded; "
        "write the values out instead of nesting aliases"
    ]
    warning = f"narr: warning: {bad}: YAML refused:"
    ran = run("run", "rules")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stderr.count(warning) == 1
    materialized = run("materialize")
    assert materialized.returncode == 0, materialized.stderr[-2000:]
    assert materialized.stderr.count(warning) == 1
    assert (project / "reports" / "report.html").is_file()

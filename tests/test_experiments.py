"""Experiment files: validation with errors naming file and field, hashing, prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from narr_assets.experiments import (
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
        ("backend: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_files_name_file_and_field(tmp_path, text, expected):
    path = write(tmp_path, "bad", text)
    with pytest.raises(ExperimentError) as err:
        load_experiment(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


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


def test_duplicate_names_rejected(tmp_path):
    write(tmp_path, "one", "name: same\n" + LLM)
    write(tmp_path, "two", "name: same\n" + LLM)
    with pytest.raises(ExperimentError, match="already used"):
        load_experiments(tmp_path)

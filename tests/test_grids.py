"""Grids: one experiment file, one experiment per combination of its `grid:` values."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from narr_assets import cli
from narr_assets.experiments import (
    MAX_GRID_MEMBERS,
    ExperimentError,
    load_experiment,
    load_experiment_file,
    load_experiments,
)

ROOT = Path(__file__).resolve().parent.parent

SWEEP = """
description: two temperatures x two prompts
backend: openai
model:
  name: test-model
  base_url: http://127.0.0.1:9/v1
prompt:
  version: base
  system: Replaced by the grid.
  user_template: "Narrative: <<TEXT>>"
grid:
  model.temperature: [0.0, 0.2]
  prompt:
    - {version: short, system: Be brief., user_template: "N: <<TEXT>>"}
    - {version: long-v2, system: Be thorough., user_template: "Narrative follows: <<TEXT>>"}
"""
MEMBERS = ["sweep__t0_0__short", "sweep__t0_0__long_v2", "sweep__t0_2__short", "sweep__t0_2__long_v2"]

# The offline grid for the CLI and Dagster: no server, fast.
RULES_GRID = """
backend: rules
grid:
  run.skip_placeholders: [true, false]
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_two_temperatures_by_two_prompts_make_four_experiments(tmp_path):
    path = write(tmp_path, "sweep", SWEEP)
    write(tmp_path, "plain", SWEEP.split("grid:")[0])
    loaded = load_experiments(tmp_path)
    assert loaded.errors == []
    members = [c for c in loaded if c.grid_name == "sweep"]
    assert [c.name for c in members] == MEMBERS
    assert [c.name for c in loaded if not c.grid_name] == ["plain"]
    assert len({c.config_hash for c in loaded}) == 5  # each member answers differently, and differs from the file
    got = [(c.model.temperature, c.prompt.version, c.system_prompt, c.user_template) for c in members]
    assert got == [
        (0.0, "short", "Be brief.", "N: <<TEXT>>"),
        (0.0, "long-v2", "Be thorough.", "Narrative follows: <<TEXT>>"),
        (0.2, "short", "Be brief.", "N: <<TEXT>>"),
        (0.2, "long-v2", "Be thorough.", "Narrative follows: <<TEXT>>"),
    ]
    first = members[0]
    assert first.grid_values == {
        "model.temperature": 0.0,
        "prompt": {"version": "short", "system": "Be brief.", "user_template": "N: <<TEXT>>"},
    }
    assert {c.source_file for c in members} == {str(path)}
    assert {c.description for c in members} == {"two temperatures x two prompts"}
    assert not any(c.run_by_default for c in members)  # a grid of LLM runs is never started by surprise
    assert load_experiment_file(path) == members


def test_run_by_default_is_the_files_and_a_plain_file_is_not_a_grid(tmp_path):
    path = write(tmp_path, "g", RULES_GRID + "run_by_default: true\n")
    assert [(c.name, c.run_by_default, c.run.skip_placeholders) for c in load_experiment_file(path)] == [
        ("g__skip_placeholders", True, True),
        ("g__no_skip_placeholders", True, False),
    ]
    assert [c.grid_name for c in load_experiment_file(write(tmp_path, "plain", "backend: rules\n"))] == [""]
    with pytest.raises(ExperimentError, match=r"declares a grid of experiments; load it with load_experiment_file"):
        load_experiment(path)


def test_the_name_key_names_the_grid(tmp_path):
    path = write(tmp_path, "file", RULES_GRID + "name: sweep\n")
    assert [(c.name, c.grid_name) for c in load_experiment_file(path)] == [
        ("sweep__skip_placeholders", "sweep"),
        ("sweep__no_skip_placeholders", "sweep"),
    ]


LONG_MODEL = "org/" + "very-long-model-name-" * 3


@pytest.mark.parametrize(
    ("grid", "names"),
    [
        ("model.temperature: [0, 0.7, 1.5]", ["t0", "t0_7", "t1_5"]),
        ("model.name: [qwen/Qwen3-8B, gpt-oss-120b]", ["qwen_Qwen3_8B", "gpt_oss_120b"]),
        ("model.seed: [-1, 7]", ["seed_1", "seed7"]),
        (
            "model.reasoning_effort: [low, high, null]",
            ["reasoning_effort_low", "reasoning_effort_high", "reasoning_effort_none"],
        ),
        ("prompt.version: [a.1, b.2]", ["a_1", "b_2"]),
        ('prompt: [{user_template: "A <<TEXT>>"}, {user_template: "B <<TEXT>>"}]', ["prompt1", "prompt2"]),
        (
            f"model.name: ['{LONG_MODEL}', '{LONG_MODEL}x']",
            ["org_very_long_model_nam_53e61ca2", "org_very_long_model_nam_493a5bb7"],
        ),
    ],
    ids=["temperature", "model_name", "negative", "none", "version", "prompt_without_version", "long_value_cut"],
)
def test_member_names_are_readable_valid_and_deterministic(tmp_path, grid, names):
    text = SWEEP.split("grid:")[0] + f"grid:\n  {grid}\n"
    configs = load_experiment_file(write(tmp_path, "g", text))
    assert [c.name for c in configs] == [f"g__{n}" for n in names]
    assert all(len(n) <= 32 for n in names)  # a long value is cut, with a digest keeping cut names apart
    assert [c.name for c in load_experiment_file(tmp_path / "g.yaml")] == [c.name for c in configs]


TOO_LONG = "\n  ".join(
    [
        f"model.name: [{'m' * 30}, {'n' * 30}]",
        f"prompt.version: [{'v' * 30}]",
        f"model.base_url: [{'u' * 30}]",
        f"prompt.system: [{'s' * 30}]",
    ]
)
NINE_BY_EIGHT = "{model.seed: [1, 2, 3, 4, 5, 6, 7, 8, 9], model.temperature: [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]}"
GRID_ERRORS = {
    "unknown_path": ("model.temprature: [0.1]", "grid.model.temprature: unknown config path (model has no field"),
    "name": ("name: [a, b]", "grid.name: unknown config path (an experiment has no field 'name' a grid may vary"),
    "internal_field": ("system_prompt: [a]", "grid.system_prompt: unknown config path"),
    "inside_a_dict": ("model.extra_body.top_k: [1]", "grid.model.extra_body.top_k: model.extra_body is one value"),
    "not_a_list": (
        "model.temperature: 0.2",
        "grid.model.temperature: expected a non-empty list of values, got a float",
    ),
    "empty_list": (
        "model.temperature: []",
        "grid.model.temperature: expected a non-empty list of values, got an empty",
    ),
    "grid_a_list": ("[model.temperature]", "grid: expected a mapping of dotted config paths to lists of values"),
    "grid_empty": ("{}", "grid: expected a mapping of dotted config paths to lists of values"),
    "key_not_text": ("{1: [a]}", "grid: key 1 is not a dotted config path"),
    "slug_collision": ("model.name: [a-b, a_b]", 'grid.model.name: "a-b" and "a_b" both make the name part \'a_b\''),
    "duplicate_value": ("model.temperature: [0.2, 0.2]", "grid.model.temperature: 0.2 and 0.2 both make the name part"),
    "prompt_versions_collide": (
        "prompt: [{version: x}, {version: x}]",
        "grid.prompt: item 1 and item 2 both make the name part 'x'; make them differ in letters or digits "
        "(a prompt is named by its `version`)",
    ),
    "overlap": ("{prompt: [{version: x}], prompt.version: [y]}", "grid.prompt.version: overlaps grid.prompt; vary one"),
    "too_many": (
        NINE_BY_EIGHT,
        f"grid: 9 x 8 = 72 combinations, more than {MAX_GRID_MEMBERS} experiments per file; split it into several",
    ),
    "name_too_long": (TOO_LONG, "grid: member name g__mmmmmm"),
    "member_invalid": (
        "model.temperature: [0.2, 3.0]",
        "grid member g__t3_0 (model.temperature=3.0): invalid experiment: model.temperature: Input should be less",
    ),
    "member_prompt_file_outside": (
        "prompt.system_file: [/etc/passwd]",
        "grid member g__system_file_etc_passwd (prompt.system_file=/etc/passwd): prompt.system_file: "
        "'/etc/passwd' resolves to /etc/passwd, outside the folders",
    ),
    "member_exclusive_fields": (
        "prompt.system: [Hi]",
        "grid member g__system_Hi (prompt.system=Hi): prompt.system and prompt.system_file are exclusive",
    ),
}


@pytest.mark.parametrize(("grid", "expected"), GRID_ERRORS.values(), ids=GRID_ERRORS.keys())
def test_grid_errors_are_one_line_naming_file_and_path(tmp_path, grid, expected):
    base = "backend: openai\nmodel: {base_url: http://127.0.0.1:9/v1}\nprompt:\n  version: v1\n"
    base += "  system_file: prompts/strict.md\n" if "prompt.system:" in grid else "  user_template: 'N: <<TEXT>>'\n"
    if "prompt.system:" in grid:
        (tmp_path / "prompts").mkdir()
        (tmp_path / "prompts" / "strict.md").write_text("Be strict.")
    path = write(tmp_path, "g", f"{base}grid:\n  {grid}\n" if "\n" in grid or ":" in grid else f"{base}grid: {grid}\n")
    write(tmp_path, "good", RULES_GRID)
    loaded = load_experiments(tmp_path)
    assert [c.grid_name for c in loaded] == ["good", "good"]  # the bad grid spoils no other file
    (error,) = loaded.errors
    assert error.path == path and error.name == "g"
    assert error.message.startswith(f"{path}: {expected}"), error.message
    assert "\n" not in error.message


def test_yaml_limits_still_apply_to_a_grid_file(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    path = write(tmp_path, "g", f"backend: rules\n{bomb}grid:\n  run.skip_placeholders: *i\n")
    started = time.monotonic()
    with pytest.raises(ExperimentError, match=r"YAML refused: more than 10,000 values"):
        load_experiment_file(path)
    assert time.monotonic() - started < 2


def test_the_example_grid_loads_and_is_not_run_by_default():
    example = ROOT / "configs" / "experiments" / "examples" / "temperature_x_prompt.yaml"
    members = load_experiment_file(example)
    assert [c.name for c in members] == [
        "temperature_x_prompt__t0_0__indicators_v1",
        "temperature_x_prompt__t0_0__strict_v1",
        "temperature_x_prompt__t0_2__indicators_v1",
        "temperature_x_prompt__t0_2__strict_v1",
    ]
    assert len({c.config_hash for c in members}) == 4 and not any(c.run_by_default for c in members)
    shipped = load_experiments(ROOT / "configs" / "experiments")  # the examples/ folder is not loaded
    assert not any(c.grid_name for c in shipped)


def test_the_cli_selects_a_grid_by_its_file_stem(project, capsys):
    write(project / "experiments", "sweep", SWEEP)
    assert [c.name for c in cli._experiments(["sweep"])] == MEMBERS
    assert [c.name for c in cli._experiments([MEMBERS[1]])] == [MEMBERS[1]]
    assert [c.name for c in cli._experiments([MEMBERS[1], "sweep", "rules"])] == [
        MEMBERS[1],
        *[m for m in MEMBERS if m != MEMBERS[1]],
        "rules",
    ]  # each member once, in the order asked
    assert [c.name for c in cli._experiments(None)] == ["rules"]  # members are not run by default
    with pytest.raises(SystemExit, match=r"unknown experiment\(s\) swep; known: rules, sweep, sweep__t0_0__long_v2"):
        cli._experiments(["swep"])


def test_a_broken_grid_named_on_the_command_line_says_why(project):
    bad = write(project / "experiments", "sweep", RULES_GRID.replace("[true, false]", "[]"))
    with pytest.raises(ExperimentError, match=rf"^{bad}: grid.run.skip_placeholders: expected a non-empty list"):
        cli._experiments(["sweep"])


def test_narr_experiments_lists_members_with_their_values(project, capsys):
    path = write(project / "experiments", "sweep", SWEEP)
    assert cli.main(["experiments"]) == 0
    lines = capsys.readouterr().out.splitlines()
    member = next(i for i, line in enumerate(lines) if line.startswith("sweep__t0_2__long_v2 "))
    assert lines[member].endswith(str(path))
    assert lines[member + 1].split() == [
        "grid",
        "sweep:",
        "model.temperature=0.2,",
        "prompt={version:",
        "long-v2}",
    ]
    assert sum(line.strip().startswith("grid sweep: ") for line in lines) == 4
    assert not any(line.strip().startswith("grid") for line in lines if line.startswith("rules"))


def test_each_member_gets_its_own_dagster_assets_group_and_job(project):
    import dagster as dg

    from narr_assets.definitions import build_definitions
    from narr_assets.defs.experiment import experiment_job_name

    write(project / "experiments", "sweep", SWEEP)
    configs = load_experiments()
    defs = build_definitions(experiments=configs)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    for name in MEMBERS:
        assert {f"{name}/classifications", f"{name}/metrics"} <= keys
    groups = {
        defs.get_assets_def(dg.AssetKey([name, "classifications"])).group_names_by_key.popitem()[1] for name in MEMBERS
    }
    assert groups == set(MEMBERS)
    jobs = {experiment_job_name(c) for c in configs if c.grid_name}
    assert jobs == {f"experiment_{name}" for name in MEMBERS}
    assert all(defs.resolve_job_def(job) for job in jobs)


@pytest.mark.slow
def test_narr_materialize_runs_a_two_by_two_grid_as_four_experiments_the_leaderboard_tells_apart(project):
    """The real `narr`, against the test server: the issue's done-when, from the file stem."""
    from conftest import write_long_csv
    from test_cli import env_for, narr

    from narr_assets.store import Store
    from narr_assets.testing.server import serve_in_subprocess

    source = write_long_csv(project / "input.csv", 6)  # 12 narratives
    with serve_in_subprocess() as server:
        write(project / "experiments", "sweep", SWEEP.replace("http://127.0.0.1:9/v1", server.base_url))
        out = narr(env_for(project, source), "materialize", "-e", "sweep")
        asked = server.stats()["completions_ok"]
    for name in MEMBERS:
        assert f"narr: {name}: 1 batch(es) to run" in out.stdout
    assert asked == 4 * 12
    board = Store(project / "narr.duckdb").query_df("SELECT experiment, n_rows FROM leaderboard ORDER BY experiment")
    assert board.to_dict("records") == [{"experiment": name, "n_rows": 12} for name in sorted(MEMBERS)]


def test_a_member_named_like_another_file_is_left_out_with_that_file(tmp_path):
    grid = write(tmp_path, "g", RULES_GRID)
    plain = write(tmp_path, "g__skip_placeholders", "backend: rules\n")
    loaded = load_experiments(tmp_path)
    assert [c.name for c in loaded] == ["g__no_skip_placeholders"]  # the grid's other member is unaffected
    assert [(e.path, e.name) for e in loaded.errors] == [
        (grid, "g__skip_placeholders"),
        (plain, "g__skip_placeholders"),
    ]
    assert loaded.errors[0].message == (
        f"{grid}: experiment name 'g__skip_placeholders' is also defined by {plain}; "
        "rename one (set `name:` or rename the file)"
    )


@pytest.mark.slow
def test_narr_run_and_export_take_a_grid_by_its_file_stem(project, capsys, tmp_path):
    write(project / "experiments", "g", RULES_GRID)
    assert cli.main(["run", "g"]) == 0
    out = capsys.readouterr().out
    assert "g__skip_placeholders (rules" in out and "g__no_skip_placeholders (rules" in out
    assert cli.main(["export", "g", "-o", str(tmp_path / "g.csv")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "g is a grid of 2 experiments; export one of: g__skip_placeholders, g__no_skip_placeholders" in err

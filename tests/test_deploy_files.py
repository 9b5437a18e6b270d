"""render.yaml, fly.toml and .env.example agree with worker/config.py and the CLI.

A deploy file is only checked when it is deployed; these tests make a typo in a variable
name, a missing secret or a kill timeout below the drain grace fail in CI instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.config import VARIABLES, ConfigError, load_settings
from worker.store.postgres import is_transaction_pooler

ROOT = Path(__file__).resolve().parents[1]
KNOWN = {variable.name for variable in VARIABLES}
SECRETS = {variable.name for variable in VARIABLES if variable.secret}
# The worker service prompts for its own secrets; DASHBOARD_TOKEN belongs to the dashboard.
WORKER_SECRETS = {v.name for v in VARIABLES if v.secret and v.group != "Dashboard"}
PLATFORM_BUILD_VARS = {"PYTHON_VERSION"}  # read by the platform, not by the worker
FALLBACK_COMMANDS = ("run", "migrate")
GATE_TOOLS = ("ruff", "mypy", "import-linter")  # dev.py check


def cli_commands() -> tuple[str, tuple[str, ...]]:
    """The console script name and its subcommands: the one place deploy commands are judged.

    Uses ``worker.cli.COMMANDS`` when the CLI module defines it; until then, the literal
    subcommands the deploy files rely on. Tighten here once the CLI lands.
    """
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("genworker") == "worker.cli:main"
    commands: tuple[str, ...] = FALLBACK_COMMANDS
    if importlib.util.find_spec("worker.cli") is not None:
        commands = tuple(getattr(importlib.import_module("worker.cli"), "COMMANDS", commands))
    return "genworker", commands


def assert_known_command(command: str) -> None:
    script, commands = cli_commands()
    argv = shlex.split(command)
    assert argv[0] == script, f"{command!r} does not run the {script} console script"
    assert len(argv) > 1 and argv[1] in commands, f"{command!r}: unknown subcommand"


@pytest.fixture(scope="module")
def render_service() -> dict[str, Any]:
    blueprint = yaml.safe_load((ROOT / "render.yaml").read_text())
    (service,) = blueprint["services"]
    return service


@pytest.fixture(scope="module")
def render_env(render_service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keys = [item["key"] for item in render_service["envVars"]]
    assert len(keys) == len(set(keys)), "duplicate envVars"
    return {item["key"]: item for item in render_service["envVars"]}


@pytest.fixture(scope="module")
def fly() -> dict[str, Any]:
    return tomllib.loads((ROOT / "fly.toml").read_text())


def fake_secrets() -> dict[str, str]:
    return {
        "SUPABASE_URL": "https://abcdefghij.supabase.co",
        "SUPABASE_SERVICE_ROLE_KEY": "sb_secret_deploy-test-0123456789",
        "DATABASE_URL": "postgresql://postgres.abcdefghij:pw-deploy-test@"
        "aws-0-us-east-1.pooler.supabase.com:5432/postgres",
        "GEMINI_API_KEY": "AIzaDeployTestKey0123456789abcdefghijk",
    }


# ----------------------------------------------------------------------------- render


def test_render_service_shape(render_service: dict[str, Any]) -> None:
    assert render_service["type"] == "worker"
    assert render_service["runtime"] == "python"
    assert render_service["name"] == "genworker"
    assert render_service["plan"] == "starter"
    assert render_service["numInstances"] >= 1


def test_render_commands_exist(render_service: dict[str, Any]) -> None:
    assert_known_command(render_service["startCommand"])
    assert_known_command(render_service["preDeployCommand"])
    build = render_service["buildCommand"]
    assert "pip install -r requirements.lock" in build and "--no-deps ." in build
    assert (ROOT / "requirements.lock").is_file()


def test_render_env_vars_are_known(render_env: dict[str, dict[str, Any]]) -> None:
    unknown = set(render_env) - KNOWN - PLATFORM_BUILD_VARS
    assert not unknown, f"render.yaml sets variables the worker does not read: {unknown}"
    assert re.fullmatch(r"3\.11\.\d+", str(render_env["PYTHON_VERSION"]["value"]))
    # Instances and deploys overlap: each process must derive its own id.
    assert "WORKER_ID" not in render_env


def test_render_secrets_are_prompted_not_committed(
    render_env: dict[str, dict[str, Any]],
) -> None:
    for name in WORKER_SECRETS | {"SUPABASE_URL"}:
        assert render_env[name] == {"key": name, "sync": False}, name
    for name, item in render_env.items():
        if item.get("sync") is not False:
            assert "value" in item, f"{name} has neither a value nor sync: false"


def test_render_shutdown_window_exceeds_grace(
    render_service: dict[str, Any],
    render_env: dict[str, dict[str, Any]],
) -> None:
    grace = float(render_env["SHUTDOWN_GRACE_S"]["value"])
    assert grace == 45
    assert render_service["maxShutdownDelaySeconds"] > grace
    assert render_service["maxShutdownDelaySeconds"] <= 300


def test_render_values_pass_validation(render_env: dict[str, dict[str, Any]]) -> None:
    env = {name: str(item["value"]) for name, item in render_env.items() if "value" in item}
    settings = load_settings({**env, **fake_secrets()})
    assert settings.is_production and settings.generation_provider == "gemini"
    assert settings.store_kind == "postgres"
    assert not is_transaction_pooler(settings.database_url or "")


# -------------------------------------------------------------------------------- fly


def test_fly_commands_exist(fly: dict[str, Any]) -> None:
    assert fly["app"] == "genworker"
    assert set(fly["processes"]) == {"worker"}
    assert_known_command(fly["processes"]["worker"])
    assert_known_command(fly["deploy"]["release_command"])


def test_fly_env_vars_are_known_and_not_secret(fly: dict[str, Any]) -> None:
    env = fly["env"]
    assert not set(env) - KNOWN, "fly.toml sets variables the worker does not read"
    assert not set(env) & SECRETS, "secrets belong in `fly secrets set`, not fly.toml"
    assert "WORKER_ID" not in env
    settings = load_settings({**env, **fake_secrets()})
    assert settings.is_production


def test_fly_kill_timeout_exceeds_grace(fly: dict[str, Any]) -> None:
    assert fly["kill_signal"] == "SIGTERM"
    grace = float(fly["env"]["SHUTDOWN_GRACE_S"])
    assert grace == 45
    assert isinstance(fly["kill_timeout"], int) and grace < fly["kill_timeout"] <= 300


def test_fly_check_targets_the_health_port(fly: dict[str, Any]) -> None:
    checks = fly["checks"]
    assert checks, "fly.toml needs a top-level [checks] entry"
    health_port = int(fly["env"].get("HEALTH_CHECK_PORT", 10000))
    for check in checks.values():
        assert check["type"] == "http"
        assert check["port"] == 10000 == health_port
        assert check["path"] == "/health"
        assert check["processes"] == ["worker"]


def test_fly_restart_and_vm(fly: dict[str, Any]) -> None:
    (restart,) = fly["restart"]
    assert restart["policy"] in ("always", "on-failure")
    assert restart["processes"] == ["worker"]
    assert fly["vm"] and all(vm["processes"] == ["worker"] for vm in fly["vm"])


# ------------------------------------------------------------------------ .env.example


def env_example() -> list[tuple[str, str]]:
    pairs = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            pairs.append((match.group(1), match.group(2)))
        else:
            assert not line.strip() or line.startswith("#"), f"unexpected line {line!r}"
    return pairs


def test_env_example_lists_exactly_the_variables() -> None:
    names = [name for name, _ in env_example()]
    assert len(names) == len(set(names)), "a variable is listed twice"
    assert names == [variable.name for variable in VARIABLES]


def test_env_example_values_are_safe_defaults() -> None:
    values = dict(env_example())
    for variable in VARIABLES:
        if variable.secret or variable.default is None:
            assert values[variable.name] == "", variable.name
        else:
            assert values[variable.name] == variable.default, variable.name


def test_env_example_text_documents_every_variable() -> None:
    text = (ROOT / ".env.example").read_text()
    for variable in VARIABLES:
        assert f"# {variable.description}" in text, variable.name


def test_env_example_with_secrets_filled_in_is_valid() -> None:
    env = {name: value for name, value in env_example() if value}
    with pytest.raises(ConfigError):
        load_settings(env)  # no store, no key: the example alone must not start a worker
    assert load_settings({**env, **fake_secrets()}).app_env == "development"


def test_dockerfile_builds_from_the_lock_and_runs_the_worker() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -r requirements.lock" in text
    assert 'CMD ["genworker", "run"]' in text
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    assert fly["build"]["dockerfile"] == "Dockerfile"


def test_readme_documents_every_variable() -> None:
    from worker.config import VARIABLES

    readme = (ROOT / "README.md").read_text()
    missing = [v.name for v in VARIABLES if f"`{v.name}`" not in readme]
    assert missing == []


def test_gate_tools_are_pinned_exactly_and_locked() -> None:
    """The gates (dev.py check) run the same versions everywhere: pinned with == in the dev
    extra, and the same versions in requirements.lock, which dev.py installs with."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = dict(r.split("==") for r in dev["dev"] if r.split("==")[0] in GATE_TOOLS)
    assert sorted(pins) == sorted(GATE_TOOLS)
    lock = dict(
        re.findall(r"^([a-z0-9-]+)==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    )
    assert {tool: lock.get(tool) for tool in GATE_TOOLS} == pins

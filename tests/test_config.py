"""Settings: defaults, validation in one message, secrets kept out of messages and repr."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from pathlib import Path

import pytest

from worker import logs
from worker.config import (
    VARIABLES,
    ConfigError,
    Settings,
    derive_worker_id,
    load_settings,
)
from worker.store.postgres import is_transaction_pooler

GEMINI_KEY = "AIzaTestGeminiKey-0123456789abcdefghijklmn"
SERVICE_KEY = "sb_secret_TestServiceRoleKey0123456789"
DB_PASSWORD = "Hunter2-Db-Passw0rd!"
DSN = (
    f"postgresql://postgres.abcdef:{DB_PASSWORD}@aws-0-eu-west-1.pooler.supabase.com:5432/postgres"
)

MINIMAL = {"DATABASE_URL": DSN, "GEMINI_API_KEY": GEMINI_KEY}


def load(**env: str) -> Settings:
    return load_settings({**MINIMAL, **env})


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    return caught.value.problems


# ------------------------------------------------------------------------------ defaults


def test_every_default() -> None:
    s = load()
    assert s.supabase_url is None and s.supabase_service_role_key is None
    assert s.database_url == DSN
    assert s.generation_provider == "gemini"
    assert s.gemini_api_key == GEMINI_KEY
    assert s.gemini_model == "gemini-3.5-flash"
    assert s.gemini_allowed_models == ("gemini-3.5-flash",)
    assert s.gemini_base_url is None
    assert s.gemini_max_concurrent_streams == 50
    assert s.gemini_requests_per_minute == 600
    assert s.gemini_connect_timeout_s == 10.0
    assert s.gemini_idle_timeout_s == 90.0
    assert s.gemini_request_timeout_s == 600.0
    assert s.gemini_section_retries == 2
    assert s.gemini_max_rate_limit_wait_s == 120.0
    assert s.worker_concurrency == 50
    assert s.job_types is None and s.job_lanes is None
    assert s.poll_interval_ms == 1000 and s.poll_max_interval_ms == 5000
    assert s.heartbeat_interval_s == 10.0
    assert s.max_retries == 3
    assert s.retry_base_s == 5.0 and s.retry_max_s == 600.0
    assert s.shutdown_grace_s == 30.0
    assert s.flush_interval_ms == 1000 and s.flush_chars == 2000
    assert s.context_tail_chars == 2000 and s.context_max_tokens == 6000
    assert s.health_port == 10000 and s.health_host == "0.0.0.0"
    assert s.app_env == "development" and not s.is_production
    assert s.log_level == "INFO" and s.log_format == "auto"
    assert not s.worker_id_is_explicit


def test_table_defaults_are_what_settings_gets() -> None:
    """The VARIABLES table is the single source of defaults (docs are tested against it)."""
    s = load()
    for variable in VARIABLES:
        if variable.field and variable.default is not None:
            assert getattr(s, variable.field) == variable.parse(variable.default), variable.name


def test_table_and_settings_agree() -> None:
    names = [v.name for v in VARIABLES]
    assert len(names) == len(set(names))
    settings_fields = {f.name for f in dataclasses.fields(Settings)}
    table_fields = {v.field for v in VARIABLES if v.field}
    derived = {"worker_id", "worker_id_source", "gemini_allowed_models"}
    assert table_fields <= settings_fields
    assert settings_fields - table_fields <= derived
    assert {v.name for v in VARIABLES if v.secret} == {
        "SUPABASE_SERVICE_ROLE_KEY",
        "GEMINI_API_KEY",
        "DATABASE_URL",
        "DASHBOARD_TOKEN",
    }
    assert all(v.description and "\n" not in v.description for v in VARIABLES)


def test_values_are_parsed_and_normalised() -> None:
    s = load(
        WORKER_CONCURRENCY=" 7 ",
        JOB_TYPES="chapter_generation, outline,,outline",
        JOB_LANES="",
        LOG_LEVEL="debug",
        LOG_FORMAT="JSON",
        APP_ENV="Production",
        GEMINI_ALLOWED_MODELS="gemini-3.5-flash,gemini-3.5-pro",
        RETRY_BASE_S="0.5",
    )
    assert s.worker_concurrency == 7
    assert s.job_types == ("chapter_generation", "outline")
    assert s.job_lanes is None
    assert s.log_level == "DEBUG" and s.log_format == "json"
    assert s.is_production
    assert s.gemini_allowed_models == ("gemini-3.5-flash", "gemini-3.5-pro")
    assert s.retry_base_s == 0.5


def test_blank_values_count_as_unset() -> None:
    s = load(WORKER_CONCURRENCY="", SUPABASE_URL="  ", WORKER_ID="")
    assert s.worker_concurrency == 50 and s.supabase_url is None
    assert not s.worker_id_is_explicit


def test_settings_is_frozen() -> None:
    s = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.worker_concurrency = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------- worker id


def test_worker_id_unique_per_process_start_and_names_the_render_service() -> None:
    env = {**MINIMAL, "RENDER_SERVICE_ID": "srv-abc123", "RENDER_INSTANCE_ID": "inst-9"}
    first, second = load_settings(env).worker_id, load_settings(env).worker_id
    assert first != second
    for worker_id in (first, second):
        assert worker_id.startswith("render-srv-abc123-inst-9-")
        assert f"-{os.getpid()}-" in worker_id
    assert load_settings(env).worker_id_source == "render"


def test_derive_worker_id_forms() -> None:
    pid = os.getpid()
    hostname = socket.gethostname()
    render = derive_worker_id({"RENDER_SERVICE_ID": "srv-1"})  # no instance id: hostname
    assert re.fullmatch(rf"render-srv-1-.+-{pid}-[0-9a-f]{{4}}", render)
    fly = derive_worker_id({"FLY_MACHINE_ID": "148e2d0c"})
    assert re.fullmatch(rf"fly-148e2d0c-{pid}-[0-9a-f]{{4}}", fly)
    host = derive_worker_id({})
    assert re.fullmatch(rf".+-{pid}-[0-9a-f]{{4}}", host)
    assert host.startswith(re.sub(r"[^A-Za-z0-9._\-]", "-", hostname)[:64])
    assert derive_worker_id({}) != derive_worker_id({})
    assert " " not in derive_worker_id({"RENDER_SERVICE_ID": "srv 1/x"})


def test_explicit_worker_id() -> None:
    s = load(WORKER_ID="worker-a", RENDER_SERVICE_ID="srv-1")
    assert s.worker_id == "worker-a" and s.worker_id_is_explicit
    assert any(p.startswith("WORKER_ID:") for p in problems({**MINIMAL, "WORKER_ID": "a b"}))


# ---------------------------------------------------------------------------- health port


def test_port_fallback() -> None:
    assert load(PORT="8080").health_port == 8080
    assert load(PORT="8080", HEALTH_CHECK_PORT="9000").health_port == 9000
    assert load(HEALTH_CHECK_PORT="9000").health_port == 9000


def test_bad_port_names_the_variable_it_came_from() -> None:
    assert problems({**MINIMAL, "PORT": "http"}) == [
        "PORT: must be an integer between 1 and 65535, got 'http'"
    ]
    assert problems({**MINIMAL, "HEALTH_CHECK_PORT": "0"}) == [
        "HEALTH_CHECK_PORT: must be an integer between 1 and 65535, got '0'"
    ]


# ------------------------------------------------------------------------------ validation


def test_all_problems_are_reported_at_once_in_one_message() -> None:
    env = {
        "WORKER_CONCURRENCY": "abc",
        "POLL_INTERVAL_MS": "10",
        "HEARTBEAT_INTERVAL_S": "0",
        "MAX_RETRIES": "-1",
        "LOG_LEVEL": "verbose",
        "LOG_FORMAT": "xml",
        "GENERATION_PROVIDER": "openai",
        "SUPABASE_URL": "not a url",
        "GEMINI_IDLE_TIMEOUT_S": "nan",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    err = caught.value
    assert len(err.problems) == 10  # nine bad values + SUPABASE_URL without its key
    assert "WORKER_CONCURRENCY: must be an integer between 1 and 500, got 'abc'" in err.problems
    assert "POLL_INTERVAL_MS: must be an integer >= 50, got '10'" in err.problems
    assert "HEARTBEAT_INTERVAL_S: must be a number > 0 (seconds), got '0'" in err.problems
    assert "MAX_RETRIES: must be an integer >= 0, got '-1'" in err.problems
    assert "LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, got 'verbose'" in err.problems
    message = str(err)
    assert message.splitlines()[0] == "genworker: invalid configuration (10 problems):"
    for name in (
        "WORKER_CONCURRENCY",
        "POLL_INTERVAL_MS",
        "HEARTBEAT_INTERVAL_S",
        "MAX_RETRIES",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "GENERATION_PROVIDER",
        "SUPABASE_URL",
        "GEMINI_IDLE_TIMEOUT_S",
        "SUPABASE_SERVICE_ROLE_KEY",
    ):
        assert f"  - {name}" in message, name
    assert ".env.example" in message


def test_cross_field_rules() -> None:
    found = problems(
        {
            **MINIMAL,
            "POLL_INTERVAL_MS": "2000",
            "POLL_MAX_INTERVAL_MS": "500",
            "RETRY_BASE_S": "60",
            "RETRY_MAX_S": "10",
            "GEMINI_ALLOWED_MODELS": "gemini-3.5-pro",
        }
    )
    assert "POLL_MAX_INTERVAL_MS: must be >= POLL_INTERVAL_MS (2000), got 500" in found
    assert "RETRY_MAX_S: must be >= RETRY_BASE_S (60), got 10" in found
    assert any(p.startswith("GEMINI_ALLOWED_MODELS: must include GEMINI_MODEL") for p in found)
    assert len(found) == 3


def test_gemini_key_required_only_for_gemini() -> None:
    found = problems({"DATABASE_URL": DSN})
    assert len(found) == 1 and found[0].startswith("GEMINI_API_KEY: required")
    s = load_settings({"DATABASE_URL": DSN, "GENERATION_PROVIDER": "offline"})
    assert s.generation_provider == "offline" and s.gemini_api_key is None


def test_only_gemini_workers_skip_jobs_of_a_model_in_cool_down() -> None:
    """The claim leaves a chapter job pending while its model (or the worker's default) is
    blocked in the fleet budget; an offline worker has no Gemini model to be blocked."""
    from worker.service import runner_config

    assert runner_config(load(GEMINI_MODEL="gemini-x")).default_model == "gemini-x"
    offline = load(GENERATION_PROVIDER="offline", GEMINI_MODEL="gemini-x")
    assert runner_config(offline).default_model is None


def test_offline_refused_in_production() -> None:
    found = problems({**MINIMAL, "GENERATION_PROVIDER": "offline", "APP_ENV": "production"})
    assert len(found) == 1
    assert found[0].startswith("GENERATION_PROVIDER: 'offline' is refused when APP_ENV=production")
    assert "placeholder" in found[0]  # says why
    assert load(GENERATION_PROVIDER="offline", APP_ENV="staging").generation_provider == "offline"


# ------------------------------------------------------------------------ store selection


def test_store_selection() -> None:
    supabase = {
        "SUPABASE_URL": "https://abcdef.supabase.co/",
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
        "GEMINI_API_KEY": GEMINI_KEY,
    }
    s = load_settings(supabase)
    assert s.store_kind == "supabase" and s.supabase_url == "https://abcdef.supabase.co"
    assert load().store_kind == "postgres"
    both = load_settings({**supabase, "DATABASE_URL": DSN})
    assert both.store_kind == "postgres"


def test_half_configured_or_missing_store_is_an_error() -> None:
    url_only = problems({"SUPABASE_URL": "https://x.supabase.co", "GEMINI_API_KEY": GEMINI_KEY})
    assert len(url_only) == 1 and url_only[0].startswith("SUPABASE_SERVICE_ROLE_KEY: required")
    key_only = problems({**MINIMAL, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    assert len(key_only) == 1 and key_only[0].startswith("SUPABASE_URL: required")
    none = problems({"GEMINI_API_KEY": GEMINI_KEY})
    assert len(none) == 1 and "no job store configured" in none[0]


def test_database_url_forms() -> None:
    assert load(DATABASE_URL="postgres://u:p@h:5432/db").store_kind == "postgres"
    pooler = load(DATABASE_URL=DSN.replace(":5432/", ":6543/"))
    assert is_transaction_pooler(pooler.database_url or "")  # PostgresTransport then polls only
    assert not is_transaction_pooler(load().database_url or "")
    assert problems({**MINIMAL, "DATABASE_URL": "mysql://u:p@h/db"})[0].startswith(
        "DATABASE_URL: must be a postgres:// or postgresql:// URL"
    )
    assert problems({**MINIMAL, "DATABASE_URL": "postgresql://h:port/db"})[0].startswith(
        "DATABASE_URL: must have a numeric port"
    )


# -------------------------------------------------------------------------------- secrets


def test_secrets_never_in_error_message() -> None:
    env = {
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,  # key without URL: an error
        "GEMINI_API_KEY": GEMINI_KEY,
        "DATABASE_URL": f"mysql://postgres:{DB_PASSWORD}@db.example.com:5432/postgres",
        "WORKER_CONCURRENCY": GEMINI_KEY,  # a secret pasted into the wrong variable
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert len(caught.value.problems) == 3
    for secret in (SERVICE_KEY, GEMINI_KEY, DB_PASSWORD):
        assert secret not in message
        assert secret not in repr(caught.value)
    assert "mysql://postgres:***@db.example.com:5432/postgres" in message


def test_secrets_never_in_repr() -> None:
    s = load_settings(
        {
            **MINIMAL,
            "SUPABASE_URL": "https://x.supabase.co",
            "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
        }
    )
    for text in (repr(s), str(s), str(s.safe_dict())):
        for secret in (SERVICE_KEY, GEMINI_KEY, DB_PASSWORD):
            assert secret not in text
        assert "aws-0-eu-west-1.pooler.supabase.com" in text  # the host stays visible
    assert s.safe_dict()["gemini_api_key"] == "***"
    assert s.gemini_api_key == GEMINI_KEY  # the real value is still there to use


def test_loading_registers_secrets_with_logging() -> None:
    key = "AIzaAnotherKeyOnlyForThisTest-9876543210"
    password = "pa%40ss-for-this-test"
    load_settings({"GEMINI_API_KEY": key, "DATABASE_URL": f"postgresql://u:{password}@h:5432/db"})
    text = logs.redact(f"key {key} password pa@ss-for-this-test and {password}")
    assert key not in text and "pa@ss-for-this-test" not in text and password not in text


# --------------------------------------------------------------------------------- .env


def test_dotenv_loaded_without_overriding_real_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        f"DATABASE_URL={DSN}\nGEMINI_API_KEY={GEMINI_KEY}\nWORKER_CONCURRENCY=7\n"
        "POLL_INTERVAL_MS=200\n"
    )
    monkeypatch.chdir(tmp_path)
    for variable in VARIABLES:
        monkeypatch.delenv(variable.name, raising=False)
    monkeypatch.setenv("WORKER_CONCURRENCY", "9")
    s = load_settings()
    assert s.worker_concurrency == 9  # the real variable wins
    assert s.poll_interval_ms == 200  # .env fills what the environment lacks
    assert "POLL_INTERVAL_MS" not in os.environ  # merged, not written into the process env
    with pytest.raises(ConfigError):
        load_settings(dotenv=False)
    explicit = load_settings({**MINIMAL})  # an explicit mapping never reads .env
    assert explicit.poll_interval_ms == 1000


# ----------------------------------------------------------------------------- dashboard

DASH_TOKEN = "dash-token-0123456789abcdef"


def dashboard(**env: str) -> Settings:
    return load_settings({"DATABASE_URL": DSN, **env}, scope="dashboard")


def dashboard_problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        dashboard(**env)
    return caught.value.problems


def test_dashboard_defaults_to_loopback_without_a_gemini_key() -> None:
    s = dashboard()
    assert (s.dashboard_host, s.dashboard_port, s.dashboard_token) == ("127.0.0.1", 10001, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "dashboard.internal"])
def test_dashboard_off_loopback_requires_a_token(host: str) -> None:
    [problem] = dashboard_problems(DASHBOARD_HOST=host)
    assert problem.startswith("DASHBOARD_TOKEN: required when DASHBOARD_HOST")
    assert dashboard(DASHBOARD_HOST=host, DASHBOARD_TOKEN=DASH_TOKEN).dashboard_host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "::1", "localhost", "[::1]"])
def test_loopback_hosts_need_no_token(host: str) -> None:
    assert dashboard(DASHBOARD_HOST=host).dashboard_token is None


def test_dashboard_token_is_a_secret_of_some_length() -> None:
    found = dashboard_problems(DASHBOARD_TOKEN="short", DASHBOARD_PORT="99999")
    assert [p.split(":")[0] for p in found] == ["DASHBOARD_PORT", "DASHBOARD_TOKEN"]
    assert "must be at least 16 characters" in found[1] and "short" not in found[1]
    s = dashboard(DASHBOARD_TOKEN=DASH_TOKEN)
    assert DASH_TOKEN not in repr(s) and DASH_TOKEN not in str(s.safe_dict())
    assert logs.redact(f"token={DASH_TOKEN}") != f"token={DASH_TOKEN}"


def test_worker_ignores_dashboard_problems() -> None:
    s = load(DASHBOARD_HOST="0.0.0.0", DASHBOARD_PORT="not-a-port")
    assert s.worker_id and s.dashboard_port is None

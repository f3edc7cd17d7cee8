import pytest

from worklist.config import DEV_SECRET, Settings
from worklist.errors import ConfigurationError


def test_the_embedded_default_is_sqlite_under_the_instance_folder() -> None:
    settings = Settings.from_env({"WORKLIST_INSTANCE_PATH": "/tmp/wl-instance"})
    assert settings.resolved_database_url == "sqlite:////tmp/wl-instance/worklist.db"
    assert settings.timezone == "Europe/London"
    assert settings.hl7_port == 2575


def test_production_without_a_secret_key_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(ConfigurationError, match="WORKLIST_SECRET_KEY must be set"):
        Settings.from_env({"WORKLIST_ENV": "production"})


def test_production_refuses_the_development_secret() -> None:
    with pytest.raises(ConfigurationError, match="development secret"):
        Settings.from_env({"WORKLIST_ENV": "production", "WORKLIST_SECRET_KEY": DEV_SECRET})


def test_the_secret_key_never_appears_in_the_repr() -> None:
    settings = Settings.from_env({"WORKLIST_SECRET_KEY": "s3cret-value-xyz"})
    assert "s3cret-value-xyz" not in repr(settings)


def test_a_port_that_is_not_a_number_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="not a number"):
        Settings.from_env({"WORKLIST_HL7_PORT": "twenty"})


def test_an_unknown_timezone_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown timezone"):
        Settings.from_env({"WORKLIST_TIMEZONE": "Europe/Atlantis"})


def test_a_priority_rules_file_that_does_not_exist_is_refused_at_start_up(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="not a file"):
        Settings.from_env({"WORKLIST_PRIORITY_RULES": str(tmp_path / "missing.json")})
    rules = tmp_path / "rules.json"
    rules.write_text("{}")
    assert Settings.from_env({"WORKLIST_PRIORITY_RULES": str(rules)}).priority_rules_path == str(
        rules
    )


def test_hl7_tls_files_must_exist_and_a_key_needs_a_certificate(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="WORKLIST_HL7_TLS_CERT names"):
        Settings.from_env({"WORKLIST_HL7_TLS_CERT": str(tmp_path / "missing.pem")})
    key = tmp_path / "key.pem"
    key.write_text("-")
    with pytest.raises(ConfigurationError, match="needs WORKLIST_HL7_TLS_CERT"):
        Settings.from_env({"WORKLIST_HL7_TLS_KEY": str(key)})
    with pytest.raises(ConfigurationError, match="APPLY_WORKERS must be 1 or more"):
        Settings.from_env({"WORKLIST_HL7_APPLY_WORKERS": "0"})

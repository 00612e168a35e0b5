"""Settings precedence and parsing; the model-family registry."""

from __future__ import annotations

import json

import pytest

from mmtriton.engine import engine_args_for, resolve_dtype
from mmtriton.families import FAMILIES, TEXT_ONLY, family_for
from mmtriton.protocol import InvalidInput
from mmtriton.settings import Settings, default_model_path


def test_defaults_env_then_overrides():
    assert Settings.load(env={}).max_model_len == 4096
    env = {"MMT_MAX_MODEL_LEN": "2048", "MMT_DTYPE": "bfloat16", "MMT_ALLOWED_LOCAL_MEDIA_DIRS": "/a:/b, /c"}
    s = Settings.load(env=env)
    assert (s.max_model_len, s.dtype, s.allowed_local_media_dirs) == (2048, "bfloat16", ("/a", "/b", "/c"))
    # config.pbtxt parameters override the environment; empty ones do not.
    s = Settings.load({"max_model_len": "1024", "dtype": ""}, env=env)
    assert (s.max_model_len, s.dtype) == (1024, "bfloat16")


def test_bad_setting_names_the_setting():
    with pytest.raises(ValueError, match="setting max_model_len: cannot read 'lots'"):
        Settings.load(env={"MMT_MAX_MODEL_LEN": "lots"})


def test_model_path_defaults_to_the_tiny_model():
    assert Settings().model_path() == str(default_model_path())
    assert Settings(model="/m").model_path() == "/m"


def write_config(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("model_type, family", [
    ("qwen2_vl", "qwen2-vl"), ("qwen2_5_vl", "qwen2-vl"), ("qwen2_audio", "qwen2-audio"), ("llava", "llava"),
    ("llama", "text"),
])
def test_family_by_model_type(tmp_path, model_type, family):
    # The directory name says "llava" on purpose: only config.json decides.
    d = tmp_path / "llava-qwen2-vl-audio"
    d.mkdir()
    assert family_for(write_config(d, model_type=model_type)).name == family


def test_family_refuses_media_it_cannot_take():
    vl = next(f for f in FAMILIES if f.name == "qwen2-vl")
    vl.check_media(["image", "video", "image"], "m")
    expected = r"model m \(qwen2-vl\) does not take audio input \(it takes: image, video\)"
    with pytest.raises(InvalidInput, match=expected):
        vl.check_media(["image", "audio"], "m")
    with pytest.raises(InvalidInput, match="text only"):
        TEXT_ONLY.check_media(["image"], "m")


def test_auto_dtype_is_the_checkpoints(tmp_path):
    a = write_config(tmp_path, model_type="qwen2_vl", text_config={"dtype": "float32"})
    assert resolve_dtype(Settings(model=str(a))) == "float32"
    assert resolve_dtype(Settings(model=str(a), dtype="bfloat16")) == "bfloat16"
    args = engine_args_for(Settings(model=str(a)), {"image": 2})
    assert args["dtype"] == "float32" and args["limit_mm_per_prompt"] == {"image": 2}


def test_prefill_and_decode_engines_take_embeddings_only(tmp_path):
    """Limits of 0 for every media kind + enable_mm_embeds: vLLM builds no vision tower, takes embeddings."""
    from mmtriton.disagg import embeddings_only_limits, kv_engine

    vl = write_config(tmp_path, model_type="qwen2_vl", text_config={"dtype": "float32"})
    for role in ("kv_producer", "kv_consumer"):
        args = kv_engine(Settings(model=str(vl)), role).engine_args
        assert args["limit_mm_per_prompt"] == {"image": 0, "video": 0}
        assert args["enable_mm_embeds"] is True
    assert embeddings_only_limits(TEXT_ONLY) == {}

"""Tiny Stable Diffusion: written with the real classes, loaded through the path real weights take."""

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from shared.errors import UserError
from workers.ml.sd import SDParts, check_model, encode_prompt, load_sd

pytestmark = pytest.mark.usefixtures("one_thread")


def test_round_trip_uses_the_real_classes(tiny_sd_dir: Path, tiny_sd: SDParts) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert (tiny_sd_dir / "model_index.json").is_file()
    assert isinstance(tiny_sd.vae, AutoencoderKL)
    assert isinstance(tiny_sd.unet, UNet2DConditionModel)
    assert isinstance(tiny_sd.text_encoder, CLIPTextModel)
    assert isinstance(tiny_sd.tokenizer, CLIPTokenizer)
    for m in (tiny_sd.vae, tiny_sd.unet, tiny_sd.text_encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert tiny_sd.vae.config.latent_channels == 4
    assert tiny_sd.unet.config.cross_attention_dim == tiny_sd.text_encoder.config.hidden_size
    assert tiny_sd.tokenizer.model_max_length == 77
    assert tiny_sd.scaling_factor > 0
    cfg = tiny_sd.scheduler_config
    assert (cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert (cfg["num_train_timesteps"], cfg["steps_offset"], cfg["clip_sample"], cfg["set_alpha_to_one"]) == (
        1000,
        1,
        False,
        False,
    )
    size = sum(f.stat().st_size for f in tiny_sd_dir.rglob("*") if f.is_file())
    assert size < 5e6


def test_vae_downsamples_by_8(tiny_sd: SDParts) -> None:
    with torch.inference_mode():
        z = tiny_sd.vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean
    assert z.shape == (1, 4, 8, 12)


def test_empty_prompt_is_a_real_embedding(tiny_sd: SDParts) -> None:
    e = encode_prompt(tiny_sd, "")
    assert e.shape == (1, 77, tiny_sd.text_encoder.config.hidden_size)
    assert e.abs().sum() > 0
    assert encode_prompt(tiny_sd, "") is e  # cached
    assert not torch.allclose(encode_prompt(tiny_sd, "infrared photo"), e)
    ids = tiny_sd.tokenizer("infrared photo").input_ids
    assert ids[0] == tiny_sd.tokenizer.bos_token_id and ids[-1] == tiny_sd.tokenizer.eos_token_id
    assert len(ids) == 4  # the tiny vocabulary has "infrared" and "photo" as whole words


def test_unknown_model_is_one_clear_line(tmp_path: Path) -> None:
    for model in (str(tmp_path / "missing"), "nobody-here/not-a-cached-model", "plainname"):
        with pytest.raises(UserError) as err:
            load_sd(model)
        msg = str(err.value)
        assert "\n" not in msg and f"model '{model}' not found" in msg and "HF_HOME" in msg
        with pytest.raises(UserError):
            check_model(model)


def test_incomplete_folder_names_what_is_missing(tmp_path: Path, tiny_sd_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    (broken / "unet" / "config.json").unlink()
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(UserError) as err:
        check_model(str(broken))
    assert "unet/config.json" in str(err.value) and "tokenizer/" in str(err.value)
    for f in (broken / "vae").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="vae/<weights>"):
        check_model(str(broken))


def test_hub_id_resolves_from_the_offline_cache(
    tmp_path: Path, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sd"
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    check_model("tiny-org/tiny-sd")
    parts = load_sd("tiny-org/tiny-sd")
    assert parts.scheduler_config["beta_schedule"] == "scaled_linear"
    with pytest.raises(UserError, match="not found"):
        check_model("tiny-org/other")

"""Stable Diffusion parts used by the translation workload: VAE, U-Net, CLIP text encoder, tokenizer, scheduler.

``load_sd`` reads a model in the diffusers folder layout (``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) from a local folder or from the offline Hugging Face cache (``HF_HOME``); nothing is downloaded.
``write_tiny_sd`` writes a tiny randomly initialised model of the same classes in the same layout, which tests and
the demo load through exactly the code path used for real weights.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.errors import UserError

#: The five sub-folders of a diffusers Stable Diffusion model and the files (any one of them) each must hold.
SD_COMPONENTS: dict[str, tuple[str, ...]] = {
    "vae": ("config.json",),
    "unet": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}
#: Components that must also hold weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin")

#: diffusers loads weights lazily (low_cpu_mem_usage) only with accelerate; without it, it would warn on every load.
_HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None

#: SD 1.x noise schedule (CompVis/stable-diffusion-v1-4 scheduler_config.json), used by ``write_tiny_sd``.
SD1_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}

_NOT_FOUND = (
    "model '{model}' not found: give a local diffusers folder (vae/, unet/, text_encoder/, tokenizer/, scheduler/) "
    "or a hub id present in the offline cache (HF_HOME), e.g. CompVis/stable-diffusion-v1-4 downloaded beforehand "
    "with `hf download`; see README"
)


@dataclass
class SDParts:
    """The loaded components, in eval mode with gradients off, on ``device`` in ``dtype``."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    #: prompt -> (1, L, D) embedding on device (CLIP is deterministic, so one forward per prompt is enough).
    prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def scaling_factor(self) -> float:
        """The VAE latent scale (0.18215 for SD 1.x)."""
        return float(self.vae.config.scaling_factor)


def _missing_parts(folder: Path) -> list[str]:
    """What a diffusers SD folder lacks: ``['unet/config.json', ...]`` (empty when complete)."""
    missing = []
    for sub, files in SD_COMPONENTS.items():
        d = folder / sub
        if not d.is_dir():
            missing.append(f"{sub}/")
            continue
        # Any one of the listed files will do (a tokenizer is saved as vocab.json+merges.txt or as tokenizer.json).
        if not any((d / f).is_file() for f in files):
            missing.append(f"{sub}/{files[0]}")
        if sub in ("vae", "unet", "text_encoder") and not any(
            p.name.endswith(WEIGHT_SUFFIXES) for p in d.iterdir() if p.is_file()
        ):
            missing.append(f"{sub}/<weights>.safetensors")
    return missing


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and "\\" not in model


def resolve_model(model: str) -> Path:
    """The local folder holding ``model`` (a path, or the cached snapshot of a hub id); UserError if none is usable."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"model '{model}' is a file: give a diffusers folder (vae/, unet/, text_encoder/, ...)"
            )
        missing = _missing_parts(path)
        if missing:
            raise UserError(
                f"model folder '{model}' is not a complete diffusers layout: missing {', '.join(missing)}"
            )
        return path
    if not _looks_like_hub_id(model):
        raise UserError(_NOT_FOUND.format(model=model))
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id=model, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several types (LocalEntryNotFound, validation errors)
        raise UserError(_NOT_FOUND.format(model=model)) from exc
    missing = _missing_parts(snapshot)
    if missing:
        raise UserError(
            f"model '{model}' is only partly in the offline cache ({snapshot}): missing {', '.join(missing)}; "
            "download it completely beforehand"
        )
    return snapshot


def check_model(model: str) -> None:
    """Cheap validation before a job is enqueued: the five components with configs and weights exist locally.

    Loads no weights. Raises UserError (one line) naming the model and what is missing.
    """
    resolve_model(model)


def load_sd(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDParts:
    """Load VAE, U-Net, CLIP text encoder, tokenizer and scheduler config of ``model`` (offline only).

    ``model`` is a local diffusers folder or a hub id already in the Hugging Face cache. Each component is
    loaded with its real class (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer) and
    ``local_files_only=True``, moved to ``device``/``dtype``, put in eval mode with gradients disabled.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer

    diffusers_logging.disable_progress_bar()  # a bar per component in every worker's log says nothing useful
    folder = resolve_model(model)
    device = torch.device(device)
    try:
        # Loading straight into ``dtype`` lets diffusers keep the modules it must keep in float32.
        kw = {"local_files_only": True, "torch_dtype": dtype, "low_cpu_mem_usage": _HAS_ACCELERATE}
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        scheduler_config = dict(
            DDIMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True)
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"model '{model}' could not be loaded from {folder}: {str(exc).splitlines()[0]}"
        ) from exc
    text_encoder.to(dtype=dtype)
    for module in (vae, unet, text_encoder):
        module.to(device=device)
        module.eval()
        module.requires_grad_(False)
    return SDParts(vae, unet, text_encoder, tokenizer, scheduler_config, device, dtype)


def encode_prompt(parts: SDParts, prompt: str) -> torch.Tensor:
    """CLIP embedding of ``prompt``: (1, L, D) with L = tokenizer.model_max_length (77 for SD), on parts' device.

    The text is padded to L tokens as in SD's pipeline and the last hidden state is returned, so the empty
    prompt is a real embedding (never zeros). Results are cached per prompt on ``parts``.
    """
    cached = parts.prompt_cache.get(prompt)
    if cached is not None:
        return cached
    tok = parts.tokenizer(
        prompt,
        padding="max_length",
        max_length=parts.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        emb = parts.text_encoder(tok.input_ids.to(parts.device))[0].to(parts.dtype)  # (1, L, D)
    parts.prompt_cache[prompt] = emb
    return emb


#: model_index.json key that marks a randomly initialised fixture (diffusers ignores keys starting with "_").
RANDOM_INIT_KEY = "_orchestrator_random_init"


def is_random_init(model: str) -> bool:
    """Whether ``model`` is an untrained fixture written by ``write_tiny_sd`` (its decodes mean nothing)."""
    try:
        index = json.loads((resolve_model(model) / "model_index.json").read_text())
    except (OSError, ValueError, UserError):
        return False
    return bool(index.get(RANDOM_INIT_KEY))

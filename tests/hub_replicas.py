"""Replicas of the real Hub repos saft-hf reads, laid out on the loopback Hub as ../shared/REAL_HUB.md describes.

Each builder names the real repo it stands for. Weights are tiny (the test CLIP), layouts are real:
- ``openai/clip-vit-base-patch32``: old-style full ``CLIPModel`` config, tokenizer and processor files,
  ``pytorch_model.bin`` (with the int64 ``position_ids`` buffers) on main, TF/Flax decoys, and the
  SFconvertbot conversion PR ``refs/pr/32`` holding ``model.safetensors``;
- ``tanganke/clip-vit-base-patch32_<task>`` (FusionBench): ``CLIPVisionModel`` config, ``model.safetensors``
  with ``vision_model.`` keys and no ``visual_projection``, a short README, no processor or tokenizer.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from transformers import CLIPModel

from tests.hub_server import LoopbackHub

OPENAI_B32 = "openai/clip-vit-base-patch32"
CONVERSION_PR = "refs/pr/32"
CONVERSION_TITLE = "Adding `safetensors` variant of this model"
DECOYS = ("tf_model.h5", "flax_model.msgpack")  # present on the real main branch, never to be fetched
METADATA_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                  "preprocessor_config.json")  # fmt: skip


def old_style_config(clip_dir: Path) -> bytes:
    """The tiny CLIP's config in the 2022 form of the real patch32 config (``*_config_dict: null`` and all)."""
    config = json.loads((clip_dir / "config.json").read_text())
    config.update(transformers_version=None, text_config_dict=None, vision_config_dict=None)
    for sub in ("text_config", "vision_config"):
        config[sub]["transformers_version"] = "4.16.0.dev0"
    return json.dumps(config, indent=2).encode()


def _pickled_state(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def clip_state(clip_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the tiny CLIPModel, buffers (int64 ``position_ids``) included, as the old .bin has them."""
    model = CLIPModel.from_pretrained(clip_dir, use_safetensors=True)
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    for tower in ("vision_model", "text_model"):
        positions = getattr(model, tower).embeddings.position_embedding.num_embeddings
        state[f"{tower}.embeddings.position_ids"] = torch.arange(positions, dtype=torch.long)[None]
    return state


def publish_openai_base(
    hub: LoopbackHub, clip_dir: Path, repo_id: str = OPENAI_B32, *, conversion_branch: bool = True
) -> dict[str, torch.Tensor]:
    """``openai/clip-vit-base-patch32`` as it is: no safetensors on main; returns the weights it holds."""
    state = clip_state(clip_dir)
    main = {name: (clip_dir / name).read_bytes() for name in METADATA_FILES if (clip_dir / name).is_file()}
    main.update({"config.json": old_style_config(clip_dir), "pytorch_model.bin": _pickled_state(state),
                 "README.md": b"---\ntags:\n- vision\n---\n# CLIP\n"})  # fmt: skip
    main.update({name: b"decoy: never download me" for name in DECOYS})
    hub.put_files(repo_id, main, message="initial weights")
    if conversion_branch:
        floats = {name: t for name, t in state.items() if t.is_floating_point()}
        hub.put_files(repo_id, {"model.safetensors": save_safetensors(floats, {"format": "pt"})}, branch=CONVERSION_PR,
                      message=CONVERSION_TITLE, title=CONVERSION_TITLE, pull_request_author="SFconvertbot")  # fmt: skip
        # Anyone can open a PR with the same title: one by someone else, with other weights, must be ignored.
        rogue = {name: torch.zeros_like(t) for name, t in floats.items()}
        hub.put_files(repo_id, {"model.safetensors": save_safetensors(rogue, {"format": "pt"})}, branch="refs/pr/40",
                      message=CONVERSION_TITLE, title=CONVERSION_TITLE, pull_request_author="someone-else")  # fmt: skip
    return state


def fusionbench_tower_id(task: str, architecture: str = "clip-vit-base-patch32") -> str:
    return f"tanganke/{architecture}_{task}"


def fusionbench_tower_files(clip_dir: Path, task: str, seed: int, scale: float = 0.05) -> tuple[dict[str, bytes], dict]:
    """A FusionBench fine-tuned tower's files for ``task``: base vision weights moved by seeded noise, and that τ."""
    generator = torch.Generator().manual_seed(seed)
    clip_config = json.loads((clip_dir / "config.json").read_text())
    vision = {name: t for name, t in clip_state(clip_dir).items() if name.startswith("vision_model.") and t.is_floating_point()}
    tau = {name: scale * torch.randn(t.shape, generator=generator) for name, t in vision.items()}
    tuned = {name: (vision[name] + tau[name]).contiguous() for name in vision}
    config = {**clip_config["vision_config"], "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
              "torch_dtype": "float32"}  # fmt: skip
    card = (f"---\nbase_model: {OPENAI_B32}\nlibrary_name: transformers\n---\n# CLIP ViT-B/32 fine-tuned on {task}\n"
            "Adam, constant lr 1e-5, 4000 steps, batch 32, vision encoder only.\n")  # fmt: skip
    files = {"config.json": json.dumps(config).encode(), "README.md": card.encode(),
             "model.safetensors": save_safetensors(tuned, {"format": "pt"})}  # fmt: skip
    return files, tau


def publish_fusionbench_tower(hub: LoopbackHub, clip_dir: Path, task: str, seed: int) -> tuple[str, dict]:
    """``tanganke/clip-vit-base-patch32_<task>`` on the loopback Hub; returns (repo id, τ)."""
    files, tau = fusionbench_tower_files(clip_dir, task, seed)
    repo_id = fusionbench_tower_id(task)
    hub.put_files(repo_id, files)
    return repo_id, tau


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    """The same files as a local folder (what a download leaves)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def bin_only_base_files(clip_dir: Path) -> dict[str, bytes]:
    """A CLIP folder with ``pytorch_model.bin`` as its only weights (the patch32 main branch, without decoys)."""
    files = {name: (clip_dir / name).read_bytes() for name in METADATA_FILES if (clip_dir / name).is_file()}
    files.update({"config.json": old_style_config(clip_dir), "pytorch_model.bin": _pickled_state(clip_state(clip_dir))})
    return files


# ----------------------------------------------------------------------------- datasets
def _parquet(dataset: Any) -> bytes:
    buffer = io.BytesIO()
    dataset.to_parquet(buffer)
    return buffer.getvalue()


def publish_dataset(
    hub: LoopbackHub,
    repo_id: str,
    splits: dict[str, Any],
    *,
    config: str | None = None,
    aliases: tuple[str, ...] = (),
) -> None:
    """A dataset repo as the real ones are after their parquet conversion: one shard per split under
    ``data/`` (or ``<config>/`` with a README ``configs:`` entry, as ``ylecun/mnist``); ``aliases`` are
    the legacy ids (``mnist``, ``svhn``) that redirect to it, served here as copies."""
    folder = config or "data"
    files = {f"{folder}/{split}-00000-of-00001.parquet": _parquet(dataset) for split, dataset in splits.items()}
    card = "---\n"
    if config:
        card += f"configs:\n- config_name: {config}\n  data_files:\n"
        card += "".join(f"  - split: {split}\n    path: {config}/{split}-*\n" for split in splits)
    card += "---\n"
    for repo in (repo_id, *aliases):
        hub.put_files(repo, {**files, "README.md": card.encode()}, repo_type="dataset")


def image_dataset(class_names: list[str], per_class: int, seed: int, size: int = 32, mode: str = "RGB") -> Any:
    """``image``/``label`` columns with a ``ClassLabel`` of ``class_names``: small noisy images, one hue a class."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(len(class_names)):
        base = rng.integers(0, 255, size=3)
        for _ in range(per_class):
            pixels = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype("uint8")
            image = PILImage.fromarray(pixels)
            images.append(image.convert(mode))
            labels.append(label)
    features = Features({"image": Image(), "label": ClassLabel(names=list(class_names))})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)

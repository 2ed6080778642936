"""Tiny, offline CLIP models and image tasks for tests, examples and a first run without the Hub.

Like ``transformers.testing_utils``: what the test suite builds, users can build too::

    python -m saft_hf.testing /tmp/saft-tiny      # writes /tmp/saft-tiny/clip and /tmp/saft-tiny/data

``clip/`` is a 2-layer random CLIP (image 32, patch 8, projection 16) with a character-level
tokenizer and an image processor, loadable with ``from_pretrained``; ``data/<Task>/`` holds
``TinyColors`` (4 classes) and ``TinyPatterns`` (3 classes) saved with ``save_to_disk`` beside a
``task_spec.json`` that :func:`saft_hf.tasks.load_task` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

__all__ = ["TINY_TASKS", "TINY_TEMPLATES", "build_tiny_clip", "build_tiny_task", "build_tiny_setup"]

TINY_IMAGE_SIZE = 32
TINY_TASKS = {
    # name -> class names; images are told apart by colour (TinyColors) or pattern (TinyPatterns)
    "TinyColors": ["red", "green", "blue", "yellow"],
    "TinyPatterns": ["horizontal stripes", "vertical stripes", "checkerboard"],
}
TINY_TEMPLATES = ["a photo of a {} thing.", "a {} picture."]
_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def write_tiny_tokenizer_files(directory: Path) -> int:
    """Write a character-level CLIP vocab.json/merges.txt (no merges); returns the vocabulary size."""
    chars = list(_byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def build_tiny_clip(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random CLIP model, its tokenizer and image processor into ``directory``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer_files(directory)
    tokenizer = CLIPTokenizer(
        vocab=json.loads((directory / "vocab.json").read_text()), merges=[], model_max_length=77
    )
    tokenizer.save_pretrained(directory)
    common = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2}
    text_config = {
        **common,
        "vocab_size": vocab_size,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {**common, "image_size": TINY_IMAGE_SIZE, "patch_size": 8}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    processor.save_pretrained(directory)
    return directory


def _tiny_image(task: str, label: int, rng: np.random.Generator) -> PILImage.Image:
    """A 32×32 image whose class is visible: a noisy colour, or a noisy stripe/checker pattern."""
    size = TINY_IMAGE_SIZE
    if task == "TinyColors":
        colour = np.array(_COLOURS[TINY_TASKS[task][label]], dtype=np.float32)
        pixels = colour + rng.normal(0, 20, size=(size, size, 3))
    else:
        rows, cols = np.indices((size, size)) // 4
        pattern = [rows % 2, cols % 2, (rows + cols) % 2][label].astype(np.float32)
        pixels = (pattern * 200 + 30)[..., None] + rng.normal(0, 20, size=(size, size, 3))
    # a few images in grey scale / RGBA exercise the RGB conversion
    mode = ["RGB", "L", "RGBA"][int(rng.integers(0, 8)) % 3 if rng.random() < 0.2 else 0]
    return PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)


def build_tiny_task(directory: Path, task: str, num_train: int = 64, num_test: int = 32, seed: int = 0) -> Path:
    """Save one tiny task as a ``DatasetDict`` (``image``, ``label``) plus its ``task_spec.json``."""
    rng = np.random.default_rng(seed)
    names = TINY_TASKS[task]
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    splits = {}
    for split, count in (("train", num_train), ("test", num_test)):
        labels = [i % len(names) for i in range(count)]
        images = [_tiny_image(task, label, rng) for label in labels]
        splits[split] = Dataset.from_dict({"image": images, "label": labels}, features=features)
    target = directory / task
    DatasetDict(splits).save_to_disk(str(target))
    spec = {"name": task, "dataset_id": f"local/{task.lower()}", "classnames": names, "templates": TINY_TEMPLATES}
    (target / "task_spec.json").write_text(json.dumps(spec, indent=2))
    return target


def build_tiny_setup(directory: str | Path) -> tuple[Path, Path]:
    """Write ``<directory>/clip`` (tiny CLIP) and ``<directory>/data`` (all tiny tasks); return both paths."""
    directory = Path(directory)
    clip_dir = build_tiny_clip(directory / "clip")
    data_dir = directory / "data"
    for seed, task in enumerate(TINY_TASKS):
        build_tiny_task(data_dir, task, seed=seed)
    return clip_dir, data_dir


def main(argv: list[str] | None = None) -> None:
    """``python -m saft_hf.testing DIR``: build the tiny offline CLIP and tasks under DIR."""
    parser = argparse.ArgumentParser(prog="python -m saft_hf.testing", description=main.__doc__)
    parser.add_argument("directory", help="where to write clip/ and data/")
    args = parser.parse_args(argv)
    clip_dir, data_dir = build_tiny_setup(args.directory)
    print(f"tiny CLIP: {clip_dir}\ntiny tasks ({', '.join(TINY_TASKS)}): {data_dir}")


if __name__ == "__main__":
    main()

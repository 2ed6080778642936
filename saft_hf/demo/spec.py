"""`BaseSpec`: what determines the demo's pre-trained base, without importing torch (``--help`` stays fast)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

# The demo's eight tasks (data.py builds them, and checks it builds exactly these).
TASK_NAMES: tuple[str, ...] = (
    "digits", "shapes", "textures", "colours", "counts", "orientations", "positions", "sizes",
)  # fmt: skip

BASE_FORMAT_VERSION = 3  # bump when pretraining changes, so old caches are not reused


@dataclass(frozen=True)
class BaseSpec:
    """Everything that determines the pre-trained base; its hash names the cache entry."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    projection_dim: int = 64
    pretext: str = "attributes"  # "attributes" (coarse captions, CLIP-like) or "recipes" (the small preset)
    pretext_classes: int = 64  # recipes: classes
    pretext_per_class: int = 100  # recipes: images per class
    pretext_scenes: int = 20000  # attributes: training scenes
    pretext_drop: float = 0.3  # attributes: chance a caption leaves an attribute out
    pretext_detail: str = "coarse"  # attributes: "coarse" or "fine" caption vocabulary
    pretrain_steps: int = 1500
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    seed: int = 0

    def vision_config(self) -> CLIPVisionConfig:
        """The `CLIPVisionConfig` of the base tower."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            intermediate_size=4 * self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            projection_dim=self.projection_dim,
        )

    def cache_key(self) -> str:
        """A short hash of the spec (and format version): same spec, same cached base."""
        payload = json.dumps({"version": BASE_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

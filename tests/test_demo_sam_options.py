"""The demo's fine-tune function passes cheap-SAM options and a LoRA adapter through to SAMTrainer."""

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from saft_hf.clip import ZeroShotHead
from saft_hf.demo.config import DemoArguments
from saft_hf.demo.finetune import finetune, training_arguments


def test_training_arguments_take_the_cheap_sam_options(tmp_path):
    options = {"sam_rho": 0.05, "sam_mode": "looksam", "sam_interval": 5, "sam_include": ["norm"]}
    args = training_arguments(DemoArguments(steps=2), str(tmp_path), options, 0)
    assert (args.sam_mode, args.sam_interval, args.sam_include, args.sam_rho) == ("looksam", 5, ["norm"], 0.05)


def test_lora_finetune_returns_a_plain_tower_that_differs_only_in_the_adapted_layers(tmp_path):
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "base")
    base = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "base").state_dict()
    head = ZeroShotHead.from_prototypes(torch.randn(3, 16), ["a", "b", "c"], logit_scale=100.0)
    train = [{"pixel_values": torch.randn(3, 16, 16), "labels": torch.tensor(i % 3)} for i in range(8)]
    args = DemoArguments(steps=3, batch_size=4, learning_rate=5e-2, progress=False)
    lora = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    tower, _ = finetune(tmp_path / "base", head, train, args, {"sam_rho": 0.05, "sam_mode": "periodic", "sam_interval": 2}, 0, lora)
    assert type(tower) is CLIPVisionModelWithProjection
    tuned = tower.state_dict()
    assert set(tuned) == set(base)
    changed = {n for n in base if not torch.equal(tuned[n], base[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed

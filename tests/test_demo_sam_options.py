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


def test_every_demo_variant_gives_valid_trainer_arguments_and_its_own_label(tmp_path):
    from saft_hf.demo.config import VARIANT_NAMES
    from saft_hf.demo.pipeline import variant_label

    args = DemoArguments(steps=2, learning_rate=1e-4, lora_learning_rate=2e-3, lora_r=4)
    labels = {}
    for variant in VARIANT_NAMES:
        built = training_arguments(args, str(tmp_path), args.variant_settings(variant), 0)
        assert built.learning_rate == (2e-3 if variant.startswith("lora") else 1e-4)
        assert (built.sam_rho > 0) == (variant not in ("standard", "lora", "standard_authors"))
        assert built.sam_loop == ("authors" if variant.endswith("_authors") else "clean")
        assert (args.variant_lora(variant) is not None) == variant.startswith("lora")
        labels[variant] = variant_label(args, variant)
    assert len(set(labels.values())) == len(labels), labels  # every table row is told apart
    assert labels["asam_looksam5"] == "ASAM ρ=0.5 LookSAM k=5" and labels["lora_asam"] == "LoRA r=4 ASAM ρ=0.5"
    assert labels["asam_authors"] == "ASAM ρ=0.5 (authors' loop)"
    periodic = training_arguments(args, str(tmp_path), args.variant_settings("asam_periodic5"), 0)
    assert (periodic.sam_mode, periodic.sam_interval, periodic.sam_adaptive) == ("periodic", 5, True)
    assert args.variant_settings("asam_on")["sam_include"] == ["norm"]


def test_demo_runs_cheap_and_lora_variants_end_to_end(tmp_path):
    import json

    from saft_hf.cli.demo import main
    from saft_hf.task_vectors import TaskVector

    argv = [
        "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
        "--tasks", "sizes", "colours", "--steps", "3", "--batch-size", "8",
        "--n-train", "8", "--n-validation", "8", "--n-test", "8", "--methods", "task_arithmetic", "ties",
        "--lambda-grid", "0.5", "1.0", "--ties-densities", "0.2", "--analysis-pairs", "0",
        "--base-hidden-size", "32", "--base-layers", "1", "--base-pretrain-steps", "2",
        "--base-pretext-scenes", "16", "--threads", "1", "--lora-r", "2",
        "--variants", "standard", "asam_looksam5", "lora_asam",
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["summary"]["ties"]["difference"]) == {"asam_looksam5", "lora_asam"}
    vector = TaskVector.from_pretrained(tmp_path / "out" / "task_vectors" / "seed-0" / "lora_asam" / "sizes")
    hyper = vector.config["finetuning"]["hyperparameters"]
    assert hyper["lora_r"] == 2 and hyper["sam_rho"] == 0.5 and hyper["learning_rate"] == 1e-3
    moved = {name for name, delta in vector.items() if delta.abs().max() > 0}
    assert moved and all(name.endswith(("proj.weight", "fc1.weight", "fc2.weight")) for name in moved), moved
    looksam = TaskVector.from_pretrained(tmp_path / "out" / "task_vectors" / "seed-0" / "asam_looksam5" / "sizes")
    assert looksam.config["finetuning"]["hyperparameters"]["sam_mode"] == "looksam"

"""Zero-shot heads, the CLIP image classifier, the vision-tower loader and evaluate_accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from saft_hf.clip import (
    CLIPImageClassifier,
    ZeroShotHead,
    build_zero_shot_head,
    collate_image_batch,
    evaluate_accuracy,
    load_vision_tower,
)
from saft_hf.metrics import load_accuracy
from saft_hf.tasks import load_task
from saft_hf.trainer import SAMTrainer, SAMTrainingArguments
from tests.fixtures_clip import TINY_TASKS, TINY_TEMPLATES

CLASSES = TINY_TASKS["TinyColors"]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return CLIPModel.from_pretrained(tiny_clip_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_clip_dir):
    return AutoTokenizer.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="module")
def head(clip, tokenizer):
    return build_zero_shot_head(clip, tokenizer, CLASSES, TINY_TEMPLATES, task="TinyColors")


@pytest.fixture(scope="module")
def test_split(tiny_clip_dir, tiny_task_data_dir):
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    return load_task("TinyColors", data_dir=tiny_task_data_dir, image_processor=processor)["test"]


def test_head_has_one_unit_row_per_class(head, clip):
    assert head.weight.shape == (len(CLASSES), clip.config.projection_dim)
    torch.testing.assert_close(head.weight.norm(dim=-1), torch.ones(len(CLASSES)))
    assert head.classnames == CLASSES


def test_head_is_the_normalised_mean_of_normalised_prompt_embeddings(head, clip, tokenizer):
    prompts = [t.format("blue") for t in TINY_TEMPLATES]
    with torch.no_grad():
        embeds = clip.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
    expected = F.normalize(F.normalize(embeds, dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(head.weight[CLASSES.index("blue")], expected)


def test_head_does_not_depend_on_the_text_batch_size(head, clip, tokenizer):
    small_batches = build_zero_shot_head(clip, tokenizer, CLASSES, TINY_TEMPLATES, batch_size=3)
    torch.testing.assert_close(small_batches.weight, head.weight)


def test_logits_are_cosines_scaled_by_the_clip_logit_scale(head, clip):
    image_embeds = torch.randn(5, head.embed_dim)
    cosines = F.normalize(image_embeds, dim=-1) @ head.weight.t()
    torch.testing.assert_close(head(image_embeds), clip.logit_scale.exp().detach() * cosines)


def test_head_round_trips_through_safetensors(head, tmp_path):
    head.save_pretrained(tmp_path)
    loaded = ZeroShotHead.from_pretrained(tmp_path)
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.logit_scale, head.logit_scale)
    assert (loaded.classnames, loaded.task) == (CLASSES, "TinyColors")
    assert not list(tmp_path.glob(".*tmp")), "no temp files left behind"


def test_head_from_prototypes_normalises_rows():
    built = ZeroShotHead.from_prototypes(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), ["a", "b"], logit_scale=10.0)
    torch.testing.assert_close(built.weight, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(built(torch.tensor([[0.0, 5.0]])), torch.tensor([[8.0, 10.0]]))


def test_head_class_count_mismatch_is_an_error(head):
    with pytest.raises(ValueError, match="4 classes but task 'X' has 3"):
        head.check_classnames(["a", "b", "c"], what="task 'X'")
    with pytest.raises(ValueError, match="one per class"):
        ZeroShotHead(torch.ones(3, 4), 1.0, ["a", "b"])


def test_load_vision_tower_takes_the_vision_weights_of_a_full_clip_checkpoint(tiny_clip_dir, clip):
    vision = load_vision_tower(tiny_clip_dir)
    assert torch.equal(vision.visual_projection.weight, clip.visual_projection.weight)
    full = clip.state_dict()
    for name, tensor in vision.state_dict().items():
        assert torch.equal(tensor, full[name]), name


def test_classifier_returns_cross_entropy_loss_and_logits(tiny_clip_dir, head):
    model = CLIPImageClassifier.from_clip(tiny_clip_dir, head)
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model(pixel_values=pixels, labels=labels)
    assert out.logits.shape == (4, len(CLASSES))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert model(pixel_values=pixels).loss is None


def test_classifier_rejects_a_head_of_another_width(tiny_clip_dir):
    with pytest.raises(ValueError, match="head embeds in 7 dims"):
        CLIPImageClassifier.from_clip(tiny_clip_dir, ZeroShotHead(torch.ones(2, 7), 1.0))


def test_only_the_vision_tower_trains_and_the_head_stays_bitwise_frozen(tiny_clip_dir, head, test_split, tmp_path):
    model = CLIPImageClassifier.from_clip(tiny_clip_dir, head)
    assert all(name.startswith("vision_model.") for name, _ in model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SAMTrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
        weight_decay=0.5, sam_rho=0.05, remove_unused_columns=False, report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = SAMTrainer(model=model, args=args, train_dataset=test_split, data_collator=collate_image_batch)
    assert trainer.model_accepts_loss_kwargs is False, "Trainer would rescale the loss by the process count"
    trainer.train()
    after = model.state_dict()
    assert torch.equal(after["head.weight"], before["head.weight"])
    assert torch.equal(after["head.logit_scale"], before["head.logit_scale"])
    assert not torch.equal(after["vision_model.visual_projection.weight"], before["vision_model.visual_projection.weight"])


def test_classifier_save_and_load_round_trip(tiny_clip_dir, head, tmp_path):
    model = CLIPImageClassifier.from_clip(tiny_clip_dir, head)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # a second save swaps in cleanly
    assert (tmp_path / "vision_model" / "model.safetensors").is_file() and (tmp_path / "head.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors", "head_config.json", "vision_model"]
    loaded = CLIPImageClassifier.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_evaluate_accuracy_equals_the_argmax_hit_rate(tiny_clip_dir, head, test_split):
    model = CLIPImageClassifier.from_clip(tiny_clip_dir, head)
    batch = test_split[:]
    with torch.no_grad():
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
    expected = (predictions == batch["labels"]).float().mean().item()
    assert evaluate_accuracy(model, test_split, batch_size=5, progress=False) == pytest.approx(expected)
    first = (predictions[:7] == batch["labels"][:7]).float().mean().item()
    assert evaluate_accuracy(model, test_split, batch_size=4, max_samples=7, progress=False) == pytest.approx(first)


def test_evaluate_accuracy_restores_training_mode(tiny_clip_dir, head, test_split):
    model = CLIPImageClassifier.from_clip(tiny_clip_dir, head).train()
    evaluate_accuracy(model, test_split, batch_size=16, max_samples=4, progress=False)
    assert model.training


def test_shipped_accuracy_metric_loads_with_the_hub_offline():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert load_accuracy().compute(predictions=[1, 2, 3, 0], references=[1, 2, 0, 0]) == {"accuracy": 0.75}

"""`DemoArguments`: every knob of the demo as one dataclass, so `HfArgumentParser` gives the CLI and `--help`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .spec import TASK_NAMES, BaseSpec

# Every merging method the demo compares: the data-free ones with their coefficients searched on
# validation, and layer-wise AdaMerging (coefficients learned on the unlabeled test inputs, its paper's way).
DEMO_METHODS = ("task_arithmetic", "ties", "pcb", "tsv_m", "iso_c", "iso_cts", "adamerging")

# The fine-tuning variants. 'asam' is full SAFT (the paper's ASAM); the 'asam_*' and 'lora*' variants are
# its cheaper forms (periodic ascent and LookSAM, Liu et al. CVPR 2022; norm-only perturbation, "SAM-ON",
# Mueller et al. NeurIPS 2023; LoRA), compared against the same standard fine-tuning. CHEAP_MODES holds
# their cheap-SAM options (SAMTrainingArguments fields).
CHEAP_MODES: dict[str, dict[str, Any]] = {
    "asam_periodic2": {"sam_mode": "periodic", "sam_interval": 2},
    "asam_periodic5": {"sam_mode": "periodic", "sam_interval": 5},
    "asam_looksam5": {"sam_mode": "looksam", "sam_interval": 5},
    "asam_on": {"sam_include": ["norm"]},  # pre_layrnorm, layer_norm1/2, post_layernorm
}

VARIANT_NAMES = (
    "standard",
    "asam",
    "sam",
    "asam_periodic2",
    "asam_periodic5",
    "asam_looksam5",
    "asam_on",
    "lora",
    "lora_asam",
    "standard_authors",
    "asam_authors",
    "sam_authors",
)
# The '*_authors' variants train through the SAFT authors' released loop (SAMTrainingArguments.sam_loop =
# 'authors': gradients never zeroed, descent not clipped, weight decay on every parameter).
SELECTIONS = ("single", "per-task")
# Every linear layer of the encoder, as examples/train_saft.py --lora_r adapts.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# Named bundles of defaults; explicit flags still override them (see cli/demo.py).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},  # the dataclass defaults: the regime chosen by the calibration in docs/benchmark_calibration.md
    # The first release's regime: a 'recipes' base that discards colour, place and size, tasks sharing one
    # input domain, lr 1e-3. Merging there recovers ~10% of the zero-shot → fine-tuned gap (see the docs).
    "small": {
        "base_pretext": "recipes",
        "base_pretrain_steps": 1500,
        "base_hidden_size": 64,
        "base_layers": 3,
        "task_domains": "shared",
        "learning_rate": 1e-3,
        "steps": 500,
        "base_pretext_detail": "coarse",
    },
}


@dataclass
class DemoArguments:
    """Size and settings of the offline SAFT-vs-standard merging benchmark."""

    preset: str = field(
        default="default",
        metadata={
            "help": "Bundle of defaults: 'default' (the regime calibrated toward the known facts of CLIP merging; "
            "docs/benchmark_calibration.md says which it meets) or 'small' (the first release's regime). "
            "Explicit flags override it.",
            "choices": list(PRESETS),
        },
    )
    output: str = field(
        default="saft-demo-output", metadata={"help": "Folder for results.json, tables and figures."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output folder."})
    tasks: list[str] = field(
        default_factory=lambda: list(TASK_NAMES),
        metadata={"help": f"Tasks to fine-tune and merge (at least 2), from: {' '.join(TASK_NAMES)}."},
    )
    variants: list[str] = field(
        default_factory=lambda: ["standard", "asam", "sam"],
        metadata={
            "help": "Fine-tuning variants compared: 'standard' (AdamW), 'asam' (the SAFT paper's ASAM: ρ = "
            "--asam-rho, T = |w| on every parameter, η = 0) and 'sam' (SAM, ρ = --sam-rho); cheaper SAFT: "
            "'asam_periodic2'/'asam_periodic5' (an ASAM step every 2nd/5th step), 'asam_looksam5' (LookSAM, "
            "k = 5), 'asam_on' (only the LayerNorms perturbed, SAM-ON), 'lora' and 'lora_asam' (a LoRA adapter "
            "of rank --lora-r, plain or ASAM); 'standard_authors', 'asam_authors', 'sam_authors': the same "
            "trained through the SAFT authors' released loop (sam_loop='authors': gradients never zeroed, the "
            "descent not clipped, weight decay on every parameter). The first is the reference the others are "
            "compared with."
        },
    )
    seeds: int = field(
        default=1, metadata={"help": "Number of seeds (data, heads, fine-tuning); mean ± std over them."}
    )
    seed_start: int = field(
        default=0,
        metadata={
            "help": "First seed: runs seeds S..S+N-1, so results can be checked on seeds nobody tuned on."
        },
    )
    steps: int = field(default=500, metadata={"help": "Fine-tuning steps per task and variant."})
    batch_size: int = field(default=32, metadata={"help": "Fine-tuning batch size."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (cosine schedule)."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (0.1 as in the SAFT paper)."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of steps for linear warm-up."})
    # SAM ρ=0.05 was chosen over ASAM ρ=0.5 (the SAFT paper's two settings) by one validation check on
    # shapes/counts/textures, seed 0, at these defaults: mean validation accuracy 76.0% vs 69.7%
    # (standard: 77.7%). Checked once, before any merging result was seen.
    sam_rho: float = field(
        default=0.05, metadata={"help": "ρ of the 'sam' variant (the SAFT paper's SAM setting)."}
    )
    asam_rho: float = field(
        default=0.5, metadata={"help": "ρ of the 'asam' variant (the SAFT paper's ASAM setting)."}
    )
    task_domains: str = field(
        default="distinct",
        metadata={
            "help": "'distinct': each task draws its images on its own background style (as the real tasks "
            "come from different image domains); 'shared': every task on plain backgrounds.",
            "choices": ["distinct", "shared"],
        },
    )
    n_train: int = field(default=1000, metadata={"help": "Training images per task."})
    n_validation: int = field(default=100, metadata={"help": "Validation images per task (λ search)."})
    n_test: int = field(default=300, metadata={"help": "Test images per task."})
    lambda_grid: list[float] | None = field(
        default=None,
        metadata={
            "help": "λ grid searched on validation for every merging method (default: each method's own)."
        },
    )
    selection: list[str] = field(
        default_factory=lambda: ["single"],
        metadata={
            "help": "How λ is chosen, one row set each: 'single' (one λ, and setting, for all tasks on mean "
            "validation accuracy: ONE merged model) and/or 'per-task' (the SAFT authors' protocol: each task's "
            "own λ on its own validation split, their grid 0.1, 0.3, 0.5, 0.7, 0.9, 1.0, TIES also over their "
            "mask rates 0.7/0.8/0.9; PCB, absent from their code, over its own grid: NOT one merged model).",
            "choices": list(SELECTIONS),
        },
    )
    ties_densities: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.3],
        metadata={"help": "TIES kept fractions searched (the SAFT code's trim rates 0.9/0.8/0.7)."},
    )
    pcb_ratios: list[float] = field(
        default_factory=lambda: [0.05, 0.1, 0.2], metadata={"help": "PCB ratios searched."}
    )
    adamerging_steps: int = field(
        default=500, metadata={"help": "Adam steps of the adamerging row (its paper's 500)."}
    )
    analysis_pairs: int = field(
        default=2,
        metadata={"help": "Task pairs analysed (ξ and joint-loss maps): (1st, 2nd), (3rd, 4th), ... tasks."},
    )
    analysis_samples: int = field(
        default=200, metadata={"help": "Test images per task for the analysis maps."}
    )
    analysis_alphas: list[float] = field(
        default_factory=lambda: [-0.5 + 0.25 * i for i in range(9)],
        metadata={"help": "Coefficients α₁, α₂ of the analysis grids."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the pre-trained base is cached (default $SAFT_HF_CACHE/demo or ~/.cache/saft_hf/demo)."
        },
    )
    base_pretrain_steps: int = field(
        default=4000, metadata={"help": "Pretext pre-training steps of the base."}
    )
    base_pretext: str = field(
        default="attributes",
        metadata={
            "help": "The base's pretext: 'attributes' (scenes with coarse, partly missing captions of 7 attributes, "
            "so the base keeps colour, place, size, ... as CLIP does) or 'recipes' (a classifier over random "
            "two-primitive recipes with random colours, the earlier regime).",
            "choices": ["attributes", "recipes"],
        },
    )
    base_pretext_detail: str = field(
        default="fine",
        metadata={
            "help": "'attributes' pretext: caption vocabulary, 'coarse' (4 hues, 4 quadrants, 2 sizes, ...) or "
            "'fine' (8 hues, 3×3 places, 4 sizes, 8 orientations, up to 4 objects).",
            "choices": ["coarse", "fine"],
        },
    )
    base_pretext_scenes: int = field(
        default=20000, metadata={"help": "'attributes' pretext: training scenes."}
    )
    base_pretext_classes: int = field(default=64, metadata={"help": "'recipes' pretext: classes."})
    base_pretext_per_class: int = field(
        default=100, metadata={"help": "'recipes' pretext: images per class."}
    )
    base_hidden_size: int = field(default=64, metadata={"help": "Hidden size of the base ViT."})
    base_layers: int = field(default=3, metadata={"help": "Transformer blocks of the base ViT."})
    base_patch_size: int = field(
        default=8, metadata={"help": "Patch size of the base ViT (images are 32×32)."}
    )
    threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads; this tiny model gains little from more (0: min(2, CPU count))."
        },
    )
    methods: list[str] = field(
        default_factory=lambda: list(DEMO_METHODS),
        metadata={
            "help": "Merging methods compared, each with its coefficients searched on validation (adamerging: "
            f"learned on the unlabeled test inputs, as its paper does): {' '.join(DEMO_METHODS)}."
        },
    )
    add_methods: list[str] | None = field(
        default=None,
        metadata={"help": "With --combine: also merge the runs' saved task vectors with these methods (e.g. methods "
                  "added to saft-hf after the runs), exactly as the runs would have."},
    )  # fmt: skip
    combine: list[str] | None = field(
        default=None,
        metadata={
            "help": "Run nothing: combine the results.json of these saft-demo output folders (same settings, "
            "disjoint seeds, e.g. two runs side by side with --seed-start 0 and 3) into one table in --output."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "Rank of the LoRA adapter of the 'lora*' variants."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha of the 'lora*' variants (update scaled by alpha / r)."}
    )
    # Fixed before any LoRA result was seen: LoRA is usually trained with a ~10x larger rate than full
    # fine-tuning (Hu et al. 2022 use 2e-4..2e-3); not tuned here.
    lora_learning_rate: float = field(
        default=1e-3, metadata={"help": "Learning rate of the 'lora*' variants (LoRA needs a larger one)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; --tasks takes names from: {' '.join(TASK_NAMES)}")
        if len(set(self.tasks)) != len(self.tasks) or len(self.tasks) < 2:
            raise ValueError(f"--tasks needs at least two distinct tasks to merge, got {self.tasks}")
        for name in ("seeds", "steps", "batch_size", "n_train", "n_validation", "n_test", "analysis_samples",
                     "adamerging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.analysis_pairs < 0:
            raise ValueError(f"--analysis-pairs must be >= 0, got {self.analysis_pairs}")
        bad_variants = [v for v in self.variants if v not in VARIANT_NAMES]
        if bad_variants or len(set(self.variants)) != len(self.variants) or not self.variants:
            raise ValueError(
                f"--variants takes distinct names from {' '.join(VARIANT_NAMES)}, got {self.variants}"
            )
        unknown_methods = [m for m in [*self.methods, *(self.add_methods or [])] if m not in DEMO_METHODS]
        if unknown_methods or not self.methods:
            raise ValueError(
                f"--methods/--add-methods take names from {' '.join(DEMO_METHODS)}, got {unknown_methods}"
            )
        if not self.selection or any(v not in SELECTIONS for v in self.selection):
            raise ValueError(f"--selection takes {' and/or '.join(SELECTIONS)}, got {self.selection}")
        if self.seed_start < 0:
            raise ValueError(f"--seed-start must be >= 0, got {self.seed_start}")
        if self.lora_r < 1 or not self.lora_alpha > 0 or not self.lora_learning_rate > 0:
            raise ValueError(
                f"--lora-r must be >= 1 and --lora-alpha, --lora-learning-rate > 0, got {self.lora_r}, "
                f"{self.lora_alpha}, {self.lora_learning_rate}"
            )
        for name in ("sam_rho", "asam_rho"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be > 0 (the standard variant is ρ = 0), got {getattr(self, name)}"
                )
        for name in ("ties_densities", "pcb_ratios"):
            bad = [v for v in getattr(self, name) if not 0 < v <= 1]
            if bad or not getattr(self, name):
                raise ValueError(
                    f"--{name.replace('_', '-')} values must be in (0, 1], got {getattr(self, name)}"
                )

    def base_spec(self) -> BaseSpec:
        """The pre-trained base this run uses (and the cache key it is stored under)."""
        return BaseSpec(
            patch_size=self.base_patch_size,
            hidden_size=self.base_hidden_size,
            num_hidden_layers=self.base_layers,
            pretrain_steps=self.base_pretrain_steps,
            pretext=self.base_pretext,
            pretext_scenes=self.base_pretext_scenes,
            pretext_detail=self.base_pretext_detail,
            pretext_classes=self.base_pretext_classes,
            pretext_per_class=self.base_pretext_per_class,
        )

    def seed_list(self) -> list[int]:
        """The seeds this run covers: seed_start .. seed_start + seeds - 1."""
        return list(range(self.seed_start, self.seed_start + self.seeds))

    def variant_settings(self, variant: str) -> dict[str, Any]:
        """SAMTrainingArguments overrides of a variant (ρ = 0 is plain AdamW, as a stock Trainer)."""
        if variant in ("standard", "lora", "standard_authors"):
            settings: dict[str, Any] = {"sam_rho": 0.0}
        elif variant in ("sam", "sam_authors"):
            settings = {"sam_rho": self.sam_rho, "sam_adaptive": False}
        else:  # the SAFT paper's code: T = |w| for every trainable parameter, no η
            settings = {"sam_rho": self.asam_rho, "sam_adaptive": True, "sam_eta": 0.0, "sam_adaptive_scope": "all"}
        settings.update(CHEAP_MODES.get(variant, {}))
        if variant.endswith("_authors"):
            settings["sam_loop"] = "authors"
        if variant.startswith("lora"):
            settings["learning_rate"] = self.lora_learning_rate
        return settings

    def variant_lora(self, variant: str) -> dict[str, Any] | None:
        """peft.LoraConfig fields of a 'lora*' variant; None for the variants that train every weight."""
        if not variant.startswith("lora"):
            return None
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "target_modules": list(LORA_TARGET_MODULES)}

    def num_threads(self) -> int:
        """torch intra-op threads: tiny models gain nothing from more than two."""
        return self.threads if self.threads > 0 else min(2, os.cpu_count() or 1)

    def pairs(self) -> list[tuple[str, str]]:
        """The analysed task pairs, fixed by task order (not chosen by outcome)."""
        return [
            (self.tasks[2 * k], self.tasks[2 * k + 1])
            for k in range(min(self.analysis_pairs, len(self.tasks) // 2))
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

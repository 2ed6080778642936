"""Task vectors on the Hugging Face Hub: model cards, push/pull, and vectors from other repo kinds.

``load_task_vector`` accepts a saft-hf task-vector repo, a full fine-tuned model repo (τ computed
against the base on the fly, tensor by tensor) or a PEFT LoRA adapter repo (τ = scaling·B@A).
Only safetensors and JSON are downloaded (``allow_patterns``): pickled weights are never read.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from torch import Tensor, nn

from .task_vector_io import (
    CONFIG_NAME,
    HEAD_FILES,
    INDEX_NAME,
    CorruptedTaskVectorError,
    IncompatibleTaskVectorError,
    SafetensorsStore,
    TaskVectorError,
    provenance_config,
    read_json,
    weight_map_of,
)
from .task_vectors import TaskVector, check_compatible

ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.md"]
TAGS = ["task-vector", "saft", "model-merging"]
_PEFT_PREFIX = "base_model.model."

_CARD_TEMPLATE = """---
{{ card_data }}
---

# Task vector: {{ task | default("unnamed task", true) }}

This repository holds a **task vector** τ = θ_fine-tuned − θ_pre-trained (Ilharco et al., ICLR 2023)
for {% if base_on_hub %}[{{ base_model }}](https://huggingface.co/{{ base_model }}){% else %}`{{ base_model }}`{% endif %}{% if base_revision %} at revision
`{{ base_revision }}`{% endif %}, made with saft-hf: {{ num_tensors }}
tensors, {{ num_parameters }} parameters, stored in safetensors.

- **Fine-tuning method:** {{ method }}{% if hyperparameters %} ({{ hyperparameters }}){% endif %}
{% if datasets %}- **Datasets:** {{ datasets | join(", ") }}
{% endif %}{% if metrics_table %}
## Metrics

| metric | value |
|---|---|
{% for name, value in metrics_table %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}
## How to merge it

```bash
saft-merge --base {{ base_model }} --repos {{ repo_id }} <other task vectors> --method ties
```

```python
from saft_hf import TaskVector

tau = TaskVector.from_pretrained("{{ repo_id }}")
model = tau.apply_to(base_model, scale=0.3)  # θ_base + 0.3·τ, written in place
```

Sharpness-aware fine-tuning (SAFT, ICLR 2025) finds flatter minima whose task vectors interfere
less when merged.
"""


# ----------------------------------------------------------------------------- model card
def _is_hub_id(name: str | None) -> bool:
    """True for a Hub repo id such as ``openai/clip-vit-base-patch32``, False for a local path or nothing."""
    if not name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def make_model_card(vector: TaskVector, repo_id: str | None = None) -> ModelCard:
    """A ``ModelCard`` with Hub metadata (library, base model, tags, datasets, metrics) and a merge snippet."""
    config = vector.config
    finetuning = config.get("finetuning") or {}
    metrics = config.get("metrics") or {}
    datasets = config.get("datasets") or ([config["dataset"]] if config.get("dataset") else [])
    base_model = config.get("base_model")
    base_on_hub = _is_hub_id(base_model)
    card_data = ModelCardData(
        library_name="saft-hf",
        base_model=base_model if base_on_hub else None,  # the Hub rejects a local path here
        tags=TAGS + ([config["task"]] if config.get("task") else []),
        datasets=list(datasets) or None,
        metrics=sorted(metrics) or None,
    )
    hyper = finetuning.get("hyperparameters") or {}
    return ModelCard.from_template(
        card_data,
        template_str=_CARD_TEMPLATE,
        task=config.get("task"),
        base_model=base_model or "<base model>",
        base_on_hub=base_on_hub,
        base_revision=config.get("base_model_revision"),
        repo_id=repo_id or config.get("repo_id") or "<this repo>",
        method=finetuning.get("method", "unknown"),
        hyperparameters=", ".join(f"{k}={v}" for k, v in sorted(hyper.items())),
        datasets=list(datasets),
        metrics_table=sorted(metrics.items()),
        num_tensors=len(vector),
        num_parameters=sum(int(torch.Size(s).numel()) for s in vector.shapes.values()),
    )


# ----------------------------------------------------------------------------- push / pull
def push_task_vector(
    vector: TaskVector,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    max_shard_size: int | None = None,
) -> str:
    """``save_pretrained`` into a temp dir, ``create_repo(exist_ok=True)``, ``upload_folder``; returns the commit SHA."""
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = repo_url.repo_id
    with tempfile.TemporaryDirectory(prefix="saft-tv-") as tmp:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        folder = vector.save_pretrained(Path(tmp) / "tv", model_card=False, **kwargs)
        make_model_card(vector, repo_id=repo_id).save(folder / "README.md")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload task vector ({vector.config.get('task', 'task')})",
            # a re-push with fewer shards must not leave stale shards behind
            delete_patterns=["task_vector*.safetensors", INDEX_NAME],
        )
    return info.oid


def download_repo(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
) -> tuple[Path, str]:
    """``snapshot_download`` of safetensors/JSON/markdown only; returns (local dir, ``repo@commit`` label)."""
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            force_download=force_download,
            allow_patterns=ALLOW_PATTERNS,
        )
    except HFValidationError as err:
        raise TaskVectorError(
            f"{repo_id!r} is neither an existing local directory nor a valid Hub repo id ('owner/name'); "
            "check the path or the id."
        ) from err
    except GatedRepoError as err:
        raise TaskVectorError(f"Hub repo {where} is gated: accept its terms and pass a token.") from err
    except RepositoryNotFoundError as err:
        raise TaskVectorError(
            f"Hub repo {where} was not found (or is private): check the id, or pass token= / log in."
        ) from err
    except RevisionNotFoundError as err:
        raise TaskVectorError(
            f"revision {revision!r} does not exist in Hub repo {repo_id!r}; pass a branch, tag or commit SHA."
        ) from err
    except LocalEntryNotFoundError as err:
        raise TaskVectorError(
            f"Hub repo {where} is not in the local cache and the Hub cannot be reached (offline?); "
            "connect once or unset HF_HUB_OFFLINE."
        ) from err
    except EntryNotFoundError as err:
        raise TaskVectorError(f"a file of Hub repo {where} is missing ({err}); check the repo contents.") from err
    directory = Path(path)
    return directory, f"{repo_id}@{directory.name}"


def _resolve(repo_or_dir: str | os.PathLike, **hub_kwargs: Any) -> tuple[Path, str]:
    path = Path(repo_or_dir)
    if path.is_dir():
        return path, str(path)
    return download_repo(str(repo_or_dir), **hub_kwargs)


def _open_checkpoint(directory: Path, source: str) -> SafetensorsStore:
    weight_map = weight_map_of(directory, source, "model.safetensors", "model.safetensors.index.json")
    if weight_map is None:
        raise TaskVectorError(
            f"{source} has no model.safetensors (or model.safetensors.index.json); saft-hf reads "
            "safetensors only, never pickled *.bin weights: convert the checkpoint to safetensors."
        )
    return SafetensorsStore(directory, weight_map, source)


def load_base_state(
    repo_or_dir: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> Mapping[str, Tensor]:
    """A base model's weights as a lazy ``Mapping[str, Tensor]`` (memory-mapped safetensors)."""
    directory, source = _resolve(repo_or_dir, revision=revision, token=token)
    return TaskVector(config={"base_model": str(repo_or_dir)}, check_finite=False, _store=_open_checkpoint(directory, source))


# ----------------------------------------------------------------------------- other repo kinds
class _DifferenceStore:
    """Lazy τ = θ_ft − θ_base for a full fine-tuned checkpoint: one tensor read at a time."""

    def __init__(self, finetuned: SafetensorsStore, base: Mapping[str, Tensor]) -> None:
        self.source = finetuned.source
        self._finetuned, self._base = finetuned, base
        names = [n for n in finetuned.weight_map if n in base and finetuned.dtypes[n] in ("F64", "F32", "F16", "BF16")]
        if not names:
            raise IncompatibleTaskVectorError(
                f"{self.source} shares no floating-point parameter names with the base; is it a model "
                "fine-tuned from this base (same architecture and naming)?"
            )
        self.weight_map = {n: finetuned.weight_map[n] for n in names}
        self.shapes = {n: finetuned.shapes[n] for n in names}
        self.dtypes = {n: finetuned.dtypes[n] for n in names}

    def get(self, name: str) -> Tensor:
        finetuned = self._finetuned.get(name)
        base = self._base[name]
        if tuple(base.shape) != tuple(finetuned.shape):
            raise IncompatibleTaskVectorError(
                f"parameter {name!r} has shape {tuple(finetuned.shape)} in {self.source} but "
                f"{tuple(base.shape)} in the base."
            )
        return (finetuned.to(torch.float32) - base.to(torch.float32)).to(finetuned.dtype)


class _LoraStore:
    """Lazy LoRA deltas: τ[name.weight] = scaling · B @ A (Hu et al. 2022; rsLoRA: α/√r, Kalajdzievski 2023)."""

    def __init__(self, adapter: SafetensorsStore, config: Mapping[str, Any]) -> None:
        self.source = adapter.source
        self._adapter = adapter
        self._fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self._pairs: dict[str, tuple[str, str, float]] = {}
        for key in adapter.weight_map:
            if ".lora_A." not in key:
                if ".lora_B." not in key:
                    raise TaskVectorError(
                        f"adapter {self.source} has a non-LoRA tensor {key!r} (modules_to_save, bias, embedding "
                        "LoRA?); only plain LoRA A/B pairs can be turned into a task vector."
                    )
                continue
            module = key.split(".lora_A.")[0]
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in adapter.weight_map:
                raise CorruptedTaskVectorError(f"adapter {self.source} has {key!r} but no {b_key!r}.")
            if len(adapter.shapes[key]) != 2:
                raise TaskVectorError(
                    f"adapter {self.source} has a LoRA on {module!r} with A of shape {adapter.shapes[key]}: "
                    "only Linear LoRA layers are supported (not Conv)."
                )
            name = (module[len(_PEFT_PREFIX) :] if module.startswith(_PEFT_PREFIX) else module) + ".weight"
            self._pairs[name] = (key, b_key, _lora_scaling(module, adapter.shapes[key][0], config))
        self.weight_map = {n: adapter.weight_map[a] for n, (a, _, _) in self._pairs.items()}
        self.shapes = {}
        self.dtypes = {}
        for name, (a_key, b_key, _) in self._pairs.items():
            shape = (adapter.shapes[b_key][0], adapter.shapes[a_key][1])
            self.shapes[name] = shape[::-1] if self._fan_in_fan_out else shape
            self.dtypes[name] = adapter.dtypes[a_key]

    def get(self, name: str) -> Tensor:
        a_key, b_key, scaling = self._pairs[name]
        lora_a, lora_b = self._adapter.get(a_key), self._adapter.get(b_key)
        delta = (lora_b.to(torch.float32) @ lora_a.to(torch.float32)) * scaling
        return (delta.T if self._fan_in_fan_out else delta).to(lora_a.dtype)


def _lora_scaling(module: str, rank: int, config: Mapping[str, Any]) -> float:
    """α/r, or α/√r with rsLoRA; per-module α from ``alpha_pattern`` matched as PEFT does."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


# Provenance beside a LoRA adapter (task, method SAM/ASAM/standard, rank, ...), in the task-vector config schema.
LORA_PROVENANCE_NAME = "saft_provenance.json"


def _lora_vector(directory: Path, source: str) -> TaskVector:
    config = read_json(directory / "adapter_config.json", source)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise TaskVectorError(
            f"{source} is a PEFT {peft_type or 'unknown'} adapter; only LoRA adapters can be read as task "
            "vectors (merge it into the model and pass the full model instead)."
        )
    if config.get("use_dora"):
        raise TaskVectorError(
            f"{source} is a DoRA adapter: its delta is not scaling·B@A; merge_and_unload() it and pass the "
            "full fine-tuned model instead."
        )
    weight_map = weight_map_of(directory, source, "adapter_model.safetensors", "adapter_model.safetensors.index.json")
    if weight_map is None:
        raise TaskVectorError(f"{source} has no adapter_model.safetensors (pickled adapters are not read).")
    store = _LoraStore(SafetensorsStore(directory, weight_map, source), config)
    base_revision = config.get("revision")
    tv_config = provenance_config(
        base_model=config.get("base_model_name_or_path"),
        base_model_revision=base_revision,
        method="lora",
        hyperparameters={k: config.get(k) for k in ("r", "lora_alpha", "use_rslora") if k in config},
    )
    if (directory / LORA_PROVENANCE_NAME).is_file():  # written by examples/train_saft.py --lora_r
        recorded = read_json(directory / LORA_PROVENANCE_NAME, source)
        tv_config = {**tv_config, **{k: v for k, v in recorded.items() if k != "format_version"}}
    head_dir = directory if (directory / HEAD_FILES[0]).is_file() else None  # a head saved beside the adapter
    return TaskVector(config=tv_config, head_dir=head_dir, _store=store)  # type: ignore[arg-type]


def load_task_vector(
    repo_or_dir: str | os.PathLike,
    *,
    base: nn.Module | Mapping[str, Tensor] | str | None = None,
    base_id: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    force_download: bool = False,
) -> TaskVector:
    """Load a task-vector, full fine-tuned model or LoRA adapter repo/dir as a lazy ``TaskVector``.

    ``base`` (a model, a state dict, or a repo id/dir) is needed for full models and is used to check
    names/shapes for every kind; pass the same mapping to many calls to load the base only once.
    """
    directory, source = _resolve(repo_or_dir, revision=revision, token=token, force_download=force_download)
    base_state: Mapping[str, Tensor] | None = None
    if isinstance(base, (str, os.PathLike)):
        base_id = base_id or str(base)
        base_state = load_base_state(base, token=token)
    elif isinstance(base, nn.Module):
        base_state = {n: p.detach() for n, p in base.named_parameters()}
    elif base is not None:
        base_state = base
    if (directory / CONFIG_NAME).is_file():
        vector = TaskVector._from_directory(directory, source=source)
    elif (directory / "adapter_config.json").is_file():
        vector = _lora_vector(directory, source)
    elif (directory / "config.json").is_file():
        if base_state is None:
            raise TaskVectorError(
                f"{source} is a full fine-tuned model: pass base= (the pre-trained model, its state dict "
                "or its repo id) to compute the task vector against it."
            )
        model_config = read_json(directory / "config.json", source)
        store = _DifferenceStore(_open_checkpoint(directory, source), base_state)
        vector = TaskVector(
            config=provenance_config(
                base_model=base_id, method="full", finetuned_model=source, model_type=model_config.get("model_type")
            ),
            _store=store,  # type: ignore[arg-type]
        )
    else:
        raise TaskVectorError(
            f"{source} has none of {CONFIG_NAME}, adapter_config.json or config.json: it is not a task "
            "vector, a PEFT adapter or a transformers model."
        )
    if base_state is not None or base_id is not None:
        check_compatible([vector], base_state, base_id=base_id)
    return vector


def load_task_vectors(
    repos: Sequence[str | os.PathLike],
    *,
    base: nn.Module | Mapping[str, Tensor] | str | None = None,
    base_id: str | None = None,
    revisions: Sequence[str | None] | None = None,
    token: str | None = None,
) -> list[TaskVector]:
    """Load several task vectors against one base (loaded once) and check they are mutually compatible."""
    if revisions is not None and len(revisions) != len(repos):
        raise TaskVectorError(f"got {len(repos)} repos but {len(revisions)} revisions; pass one per repo.")
    if isinstance(base, (str, os.PathLike)):
        base_id = base_id or str(base)
        base = load_base_state(base, token=token)
    vectors = [
        load_task_vector(repo, base=base, base_id=base_id, revision=rev, token=token)
        for repo, rev in zip(repos, revisions or [None] * len(repos))
    ]
    check_compatible(vectors, base, base_id=base_id)
    return vectors


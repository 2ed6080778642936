"""Hub transport and model cards for task vectors: download, push, and the card every repo carries.

Only safetensors, JSON and markdown are downloaded (``allow_patterns``): pickled weights are never
fetched. Reading what was downloaded is :mod:`saft_hf.readers`' job; this module knows nothing of
``TaskVector`` beyond the few attributes a card and a push need (:class:`PushableVector`), so
``task_vectors`` can use it without a cycle.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

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

from .task_vector_io import INDEX_NAME, TaskVectorError, parse_shard_size, plain_value

__all__ = [
    "ALLOW_PATTERNS",
    "PushableVector",
    "download_repo",
    "make_model_card",
    "merge_command",
    "push_task_vector",
    "resolve_repo",
]

ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.md"]
TAGS = ["task-vector", "saft", "model-merging"]


class PushableVector(Protocol):
    """The parts of a ``TaskVector`` a card and a push use."""

    config: dict[str, Any]

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]: ...

    def __len__(self) -> int: ...

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path: ...


_CARD_TEMPLATE = """---
{{ card_data }}
---

# Task vector: {{ task | default("unnamed task", true) }}

This repository holds a **task vector** τ = θ_fine-tuned − θ_pre-trained (Ilharco et al., ICLR 2023)
for {% if base_on_hub %}[{{ base_model }}](https://huggingface.co/{{ base_model }}){% else %}`{{ base_model }}`{% if base_note %} ({{ base_note }}){% endif %}{% endif %}{% if base_revision %} at revision
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
{{ merge_command }}
```

{% if local_name %}Run it in the folder that holds this task vector's folder `{{ local_name }}/` (or put its Hub id in place of
`./{{ local_name }}` once it is pushed). {% endif %}Replace `{{ other_placeholder }}` with the other task vectors (Hub ids or
folders, comma-separated, fine-tuned from the same base){% if base_recorded %}; the base model and its revision are read from
the task vectors{% else %} and `BASE_MODEL` with the pre-trained model{% endif %}. `saft-merge --help` lists every method and
option.

```python
from saft_hf import TaskVector

tau = TaskVector.from_pretrained("{{ repo_id }}")
model = tau.apply_to(base_model, scale=0.3)  # θ_base + 0.3·τ, written in place
```

Sharpness-aware fine-tuning (SAFT, ICLR 2025) finds flatter minima whose task vectors interfere
less when merged.
"""


# ----------------------------------------------------------------------------- model card
OTHER_PLACEHOLDER = "OWNER/OTHER_TASK_VECTOR"


def merge_command(repo: str, base_recorded: bool) -> str:
    """The ``saft-merge`` line a card shows: it runs once the placeholder(s) are replaced (tested)."""
    argv = ["saft-merge", "--repos", f"{repo},{OTHER_PLACEHOLDER}"]
    argv += [] if base_recorded else ["--base", "BASE_MODEL"]
    argv += ["--method", "ties", "--scaling", "1.0", "--output", "merged"]
    return shlex.join(argv)


def _is_hub_id(name: str | None) -> bool:
    """True for a Hub repo id such as ``openai/clip-vit-base-patch32``, False for a local path or nothing."""
    if not name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


DEMO_BASE_PREFIX = "saft-demo/"


def _base_shown(base_model: str | None) -> tuple[str, str | None]:
    """How a card names the base: a Hub id as it is; a local folder by its name only (a path shows the machine)."""
    if not base_model:
        return "<base model>", None
    if base_model.startswith(DEMO_BASE_PREFIX):
        return base_model, "pre-trained by saft-demo and kept in its cache, where saft-merge finds it"
    if _is_hub_id(base_model):
        return base_model, None
    return Path(base_model).name or base_model, "a local folder, recorded in task_vector_config.json"


def make_model_card(vector: PushableVector, repo_id: str | None = None, local_name: str | None = None) -> ModelCard:
    """A ``ModelCard`` with Hub metadata (library, base model, tags, datasets, metrics) and a merge snippet.

    ``repo_id`` names a vector on the Hub; ``local_name`` one saved to a folder of that name, shown as
    ``./<name>`` so the printed command runs beside it, wherever that folder is.
    """
    config = plain_value(vector.config)
    finetuning = config.get("finetuning") or {}
    metrics = config.get("metrics") or {}
    datasets = config.get("datasets") or ([config["dataset"]] if config.get("dataset") else [])
    base_model = config.get("base_model")
    base_on_hub = _is_hub_id(base_model) and not str(base_model).startswith(DEMO_BASE_PREFIX)
    shown_base, base_note = _base_shown(base_model)
    card_data = ModelCardData(
        library_name="saft-hf",
        base_model=base_model if base_on_hub else None,  # the Hub rejects a local path here
        tags=TAGS + ([config["task"]] if config.get("task") else []),
        datasets=list(datasets) or None,
        metrics=sorted(metrics) or None,
    )
    hyper = finetuning.get("hyperparameters") or {}
    repo_id = repo_id or config.get("repo_id")
    repo = repo_id or (f"./{local_name}" if local_name else "OWNER/THIS_TASK_VECTOR")
    return ModelCard.from_template(
        card_data,
        template_str=_CARD_TEMPLATE,
        task=config.get("task"),
        base_model=shown_base,
        base_note=base_note,
        base_on_hub=base_on_hub,
        local_name=None if repo_id else local_name,
        base_revision=config.get("base_model_revision"),
        repo_id=repo,
        merge_command=merge_command(repo, base_recorded=bool(base_model)),
        other_placeholder=OTHER_PLACEHOLDER,
        base_recorded=bool(base_model),
        method=finetuning.get("method", "unknown"),
        hyperparameters=", ".join(f"{k}={_shown(v)}" for k, v in sorted(hyper.items())),
        datasets=list(datasets),
        metrics_table=sorted(metrics.items()),
        num_tensors=len(vector),
        num_parameters=sum(int(torch.Size(s).numel()) for s in vector.shapes.values()),
    )


def _shown(value: Any) -> Any:
    """A hyperparameter as a card shows it: whole floats as integers (``warmup_steps=0``, not ``0.0``)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# ----------------------------------------------------------------------------- push / pull
def push_task_vector(
    vector: PushableVector,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    max_shard_size: int | str | None = None,
) -> str:
    """``save_pretrained`` into a temp dir, ``create_repo(exist_ok=True)``, ``upload_folder``; returns the commit SHA."""
    if max_shard_size is not None:
        max_shard_size = parse_shard_size(max_shard_size)  # a bad size fails before the repo is created
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


def resolve_repo(repo_or_dir: str | os.PathLike, **hub_kwargs: Any) -> tuple[Path, str]:
    """A local folder as it is, else :func:`download_repo`; returns (folder, label for messages)."""
    path = Path(repo_or_dir)
    if path.is_dir():
        return path, str(path)
    return download_repo(str(repo_or_dir), **hub_kwargs)

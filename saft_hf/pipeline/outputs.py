"""What a merge writes: merged vision model, heads, ``merge_config.json``, ``results.json`` and a model card."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ..io_utils import atomic_write_json
from ..merging.adamerging import coefficient_table
from ..readers import safe_name
from ..task_vectors import HEAD_FILES, TaskVector

CARD_TAGS = ["saft", "model-merging", "merge"]

_CARD_TEMPLATE = """---
{{ card_data }}
---

# Merged CLIP vision tower ({{ method }})

{{ repos | length }} task vectors merged into
{% if base_is_hub %}[{{ base_model }}](https://huggingface.co/{{ base_model }}){% else %}`{{ base_model }}`{% endif %}
with **{{ method }}** ({{ paper }}) by [saft-hf](https://github.com/saft-hf/saft-hf)'s `saft-merge`.

| task vector | revision |
|---|---|
{% for repo in repos %}| {{ repo.repo }} | {{ repo.resolved_revision or repo.revision or "local" }} |
{% endfor %}
- **Parameters:** {{ parameters }}
{% if search %}- **λ chosen by search:** {{ scaling }} (best {{ search.selection }} mean validation accuracy over {{ search.grid | length }} values)
{% elif scaling %}- **λ:** {{ scaling }}
{% endif %}{% if adamerging %}
## AdaMerging coefficients

λ learned ({{ adamerging.method_args.granularity }}-wise{% if adamerging.method_args.ties %}, AdaMerging++ with TIES
density {{ adamerging.method_args.density }}{% endif %}) by minimising the mean prediction entropy on unlabeled
{{ adapt_split }} inputs over {{ adamerging.entropy | length }} steps: entropy {{ "%.4f" | format(adamerging.entropy[0]) }} →
{{ "%.4f" | format(adamerging.entropy[-1]) }}. Values: `adamerging_coefficients.json`.

![AdaMerging coefficients, task × block](adamerging_coefficients.png)

<details><summary>λ per block (rows) and task (columns)</summary>

{{ adamerging_table }}

</details>
{% endif %}{% if evaluation %}
## Results (test split)

```
{{ evaluation_table }}
```
{% endif %}
## Use

```python
from transformers import CLIPVisionModelWithProjection

model = CLIPVisionModelWithProjection.from_pretrained("<this repo>")
```

Each task's zero-shot head is in `heads/<task>/` (`head.safetensors`, `head_config.json`); load it with
`saft_hf.clip.ZeroShotHead.from_pretrained`. `merge_config.json` records every input and option.
"""


def copy_heads(
    vectors: Sequence[TaskVector], tasks: Sequence[str], directory: Path, built: Mapping[str, Any] | None = None
) -> list[str]:
    """Each vector's head files (or the head built for it from the base) into ``heads/<task>/``; returns the tasks."""
    written = []
    for vector, task in zip(vectors, tasks):
        target = directory / "heads" / safe_name(task, what="task name", source=vector.source)
        if vector.head_dir is None:
            if task in (built or {}):
                built[task].save_pretrained(target)
                written.append(task)
            continue
        target.mkdir(parents=True, exist_ok=True)
        for filename in HEAD_FILES:
            if (vector.head_dir / filename).is_file():
                shutil.copyfile(vector.head_dir / filename, target / filename)
        written.append(task)
    return written


def make_merge_card(merge_config: Mapping[str, Any], results: Mapping[str, Any], evaluation_table: str | None) -> ModelCard:
    """A ``ModelCard`` with Hub metadata (base_model, merge tags, the merged repos) and the results."""
    base = merge_config["base_model"]
    base_is_hub = not base.get("local", False)
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base["id"] if base_is_hub else None,
        base_model_relation="merge" if base_is_hub else None,
        tags=CARD_TAGS + [merge_config["method"]],
        merged_repos=[r["repo"] for r in merge_config["repos"]],
        merge_method=merge_config["method"],
    )
    method_args = merge_config["method_args"]
    return ModelCard.from_template(
        card_data,
        template_str=_CARD_TEMPLATE,
        base_model=base["id"],
        base_is_hub=base_is_hub,
        method=merge_config["method"],
        paper=merge_config.get("paper", ""),
        repos=merge_config["repos"],
        parameters=", ".join(f"{k}={v}" for k, v in method_args.items()) or "none",
        scaling=merge_config.get("scaling"),
        search=merge_config.get("search"),
        evaluation=results.get("evaluation"),
        evaluation_table=evaluation_table,
        **_adamerging_card_args(merge_config, results),
    )


def _adamerging_card_args(merge_config: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """Template values of the card's AdaMerging section (empty when the merge learned no coefficients)."""
    learned = results.get("adamerging")
    if not learned:
        return {"adamerging": None}
    table = coefficient_table(learned["tasks"], learned["blocks"], learned["coefficients"])
    split = (merge_config.get("adaptation") or {}).get("split")
    return {"adamerging": learned, "adamerging_table": table, "adapt_split": split}


def write_metadata(
    directory: Path,
    merge_config: Mapping[str, Any],
    results: Mapping[str, Any],
    evaluation_table: str | None,
) -> None:
    """``merge_config.json``, ``results.json`` and ``README.md`` into ``directory``."""
    atomic_write_json(directory / "merge_config.json", merge_config)
    atomic_write_json(directory / "results.json", results)
    make_merge_card(merge_config, results, evaluation_table).save(directory / "README.md")


def push_folder(folder: Path, repo_id: str, private: bool | None, token: str | None, message: str) -> str:
    """Create ``repo_id`` if needed and upload ``folder``; returns the commit URL (the token is never shown)."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    return info.commit_url

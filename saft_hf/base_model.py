"""Find and read a *base* (pre-trained) model the way transformers does, and say which file was read.

Order, as ``from_pretrained`` resolves a checkpoint:
1. ``model.safetensors`` (or its shards) at the asked revision;
2. else, on the default branch, the safetensors conversion pull request opened by the Hub's
   ``SFconvertbot`` (``refs/pr/N``; ``openai/clip-vit-base-patch32`` has no safetensors on main,
   only on ``refs/pr/32``): config, tokenizer and processor from main, weights from that branch;
3. else ``pytorch_model.bin``, read by transformers' own loader, which unpickles with
   ``torch.load(weights_only=True)`` (it refuses torch < 2.6).

This applies to base models only: task vectors, fine-tuned repos and adapters stay safetensors-only
(:mod:`saft_hf.readers`). TensorFlow and Flax weights are never downloaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .io_utils import atomic_output_dir, cache_root
from .task_vector_io import TaskVectorError

__all__ = [
    "BaseCheckpoint",
    "BaseModelError",
    "base_state_dict",
    "load_base_clip",
    "load_base_vision_tower",
    "resolve_base",
]

META_PATTERNS = ["*.json", "*.txt", "*.md"]  # config, tokenizer (vocab.json, merges.txt), processor, card
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
SAFETENSORS_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
BIN_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]
CONVERSION_BOT = "SFconvertbot"
CONVERSION_TITLE = "Adding `safetensors` variant of this model"
DEMO_PREFIX = "saft-demo/"  # task vectors of saft-demo record their base as saft-demo/base-<key>
CONVERSION_RECORD = "conversion.json"
_PR_REF = re.compile(r"refs/pr/(\d+)$")

SAFETENSORS, CONVERSION_BRANCH, PICKLED = "safetensors", "safetensors conversion branch", "pytorch_model.bin"


class BaseModelError(TaskVectorError):
    """A base model cannot be found or read (no usable weights, not cached offline, unknown repo)."""


@dataclass
class BaseCheckpoint:
    """A base model as a local folder (config, processor, tokenizer, weights) and what exactly was read."""

    id: str
    directory: Path
    weights: str  # SAFETENSORS, CONVERSION_BRANCH or PICKLED
    weights_file: str
    revision: str | None = None
    resolved_revision: str | None = None  # commit of the config/tokenizer files (None for a local folder)
    weights_revision: str | None = None  # the branch the weights came from, when it is not ``revision``
    weights_commit: str | None = None

    @property
    def local(self) -> bool:
        return self.resolved_revision is None

    @property
    def safetensors(self) -> bool:
        return self.weights != PICKLED

    def record(self) -> dict[str, Any]:
        """What ``merge_config.json`` and cards say about the base (no local path: see ``describe``)."""
        record = asdict(self)
        record.pop("directory")
        record["local"] = self.local
        return record

    def describe(self) -> str:
        """One line for the user: which file of which revision was read."""
        where = f" from {self.weights_revision} (commit {self.weights_commit})" if self.weights_revision else ""
        pinned = f" at commit {self.resolved_revision}" if self.resolved_revision else ""
        how = " (transformers' weights_only loader)" if self.weights == PICKLED else ""
        name = Path(self.id).name if self.local and Path(self.id).is_dir() else self.id  # no path in published notes
        return f"base {name}{pinned}: {self.weights_file}{where}{how}"


def _present(directory: Path, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if (directory / name).is_file()), None)


def _local(directory: Path, name: str) -> BaseCheckpoint:
    if directory.name.startswith("base-") and (directory / "pretext.json").is_file():
        name = DEMO_PREFIX + directory.name  # the id saft-demo records in its task vectors
    if not (directory / "config.json").is_file():
        raise BaseModelError(f"base {name!r} has no config.json; point --base at a transformers model folder or Hub id.")
    for weights, files in ((SAFETENSORS, SAFETENSORS_FILES), (PICKLED, BIN_FILES)):
        found = _present(directory, files)
        if found:
            return BaseCheckpoint(name, directory, weights, found)
    raise BaseModelError(
        f"base {name!r} has no model.safetensors and no pytorch_model.bin (TensorFlow/Flax weights are not read); "
        "save it with save_pretrained."
    )


def _hub_errors(repo_id: str, revision: str | None, err: Exception) -> BaseModelError:
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(err, HFValidationError):
        return BaseModelError(f"base {repo_id!r} is neither a local folder nor a valid Hub repo id; check --base.")
    if isinstance(err, GatedRepoError):
        return BaseModelError(f"base {where} is gated: accept its terms on the Hub and log in (or set HF_TOKEN).")
    if isinstance(err, RevisionNotFoundError):
        return BaseModelError(f"revision {revision!r} of base {repo_id!r} does not exist; pass a branch, tag or SHA.")
    if isinstance(err, RepositoryNotFoundError):
        return BaseModelError(f"base {where} was not found on the Hub (or is private): check the id, or log in.")
    return BaseModelError(
        f"base {where} is not in the local cache and the Hub cannot be reached (offline?); connect once or unset "
        "HF_HUB_OFFLINE."
    )


def _snapshot(repo_id: str, revision: str, patterns: list[str], token: str | None, **kwargs: Any) -> Path:
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token, **kwargs))


def conversion_branch(api: HfApi, repo_id: str) -> str | None:
    """``refs/pr/N`` of the newest safetensors conversion PR opened by ``SFconvertbot``, or None.

    Only the bot's PRs count, as in transformers' ``safetensors_conversion``: anyone can open a PR.
    """
    found = [
        d.git_reference
        for d in api.get_repo_discussions(repo_id, author=CONVERSION_BOT, discussion_type="pull_request")
        if d.author == CONVERSION_BOT and d.title == CONVERSION_TITLE and d.status in ("open", "merged") and d.git_reference
    ]
    return max(found, key=lambda ref: int(_PR_REF.search(ref).group(1)), default=None)


def _combined(repo_id: str, main_dir: Path, weights_dir: Path, weights_file: str, branch: str) -> Path:
    """A folder of links: main's config/tokenizer/processor files beside the conversion branch's weights.

    Named ``<main commit>+<weights commit>`` with a ``conversion.json``, so an offline run finds the pairing
    that was checked online.
    """
    target = _combined_root(repo_id) / f"{main_dir.name}+{weights_dir.name}"
    if (target / weights_file).exists() and (target / CONVERSION_RECORD).is_file():
        return target
    sources = [p for p in main_dir.iterdir() if p.suffix in (".json", ".txt", ".md")]
    sources += [p for p in weights_dir.iterdir() if p.name in SAFETENSORS_FILES or p.suffix == ".safetensors"]
    with atomic_output_dir(target, overwrite=True) as tmp:
        for path in sources:  # the weights' index (if sharded) replaces nothing of main's: main has none
            (tmp / path.name).unlink(missing_ok=True)
            (tmp / path.name).symlink_to(path.resolve())
        record = {"branch": branch, "weights_commit": weights_dir.name, "weights_file": weights_file}
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record))
    return target


def _combined_root(repo_id: str) -> Path:
    return cache_root() / "bases" / repo_id.replace("/", "--")


def _from_hub(repo_id: str, revision: str | None, token: str | None, cache_dir: str | None) -> BaseCheckpoint:
    api = HfApi(token=token)
    asked = revision or "main"  # downloads go by name, so the cache keeps the ref for offline use
    info = api.model_info(repo_id, revision=asked)
    files = {s.rfilename for s in info.siblings or []}
    kwargs = {"cache_dir": cache_dir}
    safetensors = next((f for f in SAFETENSORS_FILES if f in files), None)
    if safetensors:
        directory = _snapshot(repo_id, asked, META_PATTERNS + SAFETENSORS_PATTERNS, token, **kwargs)
        return BaseCheckpoint(repo_id, directory, SAFETENSORS, safetensors, revision, directory.name)
    # the conversion PR holds main's weights: it serves main, or a revision pinned to main's commit (as the
    # task vectors record it), not an older commit
    on_main = asked == "main" or info.sha == api.model_info(repo_id, revision="main").sha
    branch = conversion_branch(api, repo_id) if on_main else None
    if branch is not None:
        weights_dir = _snapshot(repo_id, branch, SAFETENSORS_PATTERNS, token, **kwargs)
        weights_file = _present(weights_dir, SAFETENSORS_FILES)
        if weights_file:
            main_dir = _snapshot(repo_id, asked, META_PATTERNS, token, **kwargs)
            directory = _combined(repo_id, main_dir, weights_dir, weights_file, branch)
            return BaseCheckpoint(
                repo_id, directory, CONVERSION_BRANCH, weights_file, revision, main_dir.name, branch, weights_dir.name
            )
    pickled = next((f for f in BIN_FILES if f in files), None)
    if pickled:
        directory = _snapshot(repo_id, asked, META_PATTERNS + BIN_PATTERNS, token, **kwargs)
        return BaseCheckpoint(repo_id, directory, PICKLED, pickled, revision, directory.name)
    raise BaseModelError(
        f"base {repo_id!r} has no model.safetensors, no safetensors conversion branch by {CONVERSION_BOT} and no "
        "pytorch_model.bin (TensorFlow/Flax weights are not read); pick a PyTorch checkpoint."
    )


def _cached(repo_id: str, revision: str, patterns: list[str], names: tuple[str, ...], cache_dir: str | None) -> tuple[Path, str] | None:
    """(snapshot folder, weights file) if the cache holds ``revision`` with one of ``names``, else None."""
    try:
        folder = _snapshot(repo_id, revision, patterns, None, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        return None
    found = _present(folder, names)
    return (folder, found) if found else None


def _from_cache(repo_id: str, revision: str | None, cache_dir: str | None) -> BaseCheckpoint:
    """Offline: the same order over what the caches hold (a conversion branch as paired online before)."""
    asked = revision or "main"
    hit = _cached(repo_id, asked, META_PATTERNS + SAFETENSORS_PATTERNS, SAFETENSORS_FILES, cache_dir)
    if hit:
        return BaseCheckpoint(repo_id, hit[0], SAFETENSORS, hit[1], revision, hit[0].name)
    refs = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs"
    commit = (refs / asked).read_text().strip() if asked == "main" and (refs / asked).is_file() else asked
    for folder in sorted(_combined_root(repo_id).glob(f"{commit}+*")):  # pairings checked online before
        record = json.loads((folder / CONVERSION_RECORD).read_text()) if (folder / CONVERSION_RECORD).is_file() else {}
        if record and (folder / record["weights_file"]).exists():
            return BaseCheckpoint(repo_id, folder, CONVERSION_BRANCH, record["weights_file"], revision, commit,
                                  record["branch"], record["weights_commit"])  # fmt: skip
    hit = _cached(repo_id, asked, META_PATTERNS + BIN_PATTERNS, BIN_FILES, cache_dir)
    if hit:
        return BaseCheckpoint(repo_id, hit[0], PICKLED, hit[1], revision, hit[0].name)
    raise BaseModelError(
        f"base {repo_id!r}" + (f" at revision {revision!r}" if revision else "") + " has no usable weights in the "
        "local cache and the Hub cannot be reached (offline?); connect once or unset HF_HUB_OFFLINE."
    )


def resolve_base(
    base: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> BaseCheckpoint:
    """The base model ``base`` (Hub id or folder) as a local folder, downloading only what will be read."""
    path = Path(base).expanduser()
    if path.is_dir():
        return _local(path, str(base))
    if str(base).startswith(DEMO_PREFIX):
        cached = cache_root() / "demo" / str(base)[len(DEMO_PREFIX) :]
        if not cached.is_dir():
            raise BaseModelError(
                f"base {str(base)!r} was pre-trained by saft-demo and is cached by it under {cache_root() / 'demo'}, "
                "where it is not (another machine, or saft-demo --cache_dir?): pass --base with the demo's cached "
                "folder (…/base-<key>), or run saft-demo here first."
            )
        return _local(cached, str(base))
    cache = str(cache_dir) if cache_dir is not None else None
    try:
        if constants.HF_HUB_OFFLINE:
            return _from_cache(str(base), revision, cache)
        return _from_hub(str(base), revision, token, cache)
    except (HFValidationError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
            LocalEntryNotFoundError, OfflineModeIsEnabled) as err:  # fmt: skip
        raise _hub_errors(str(base), revision, err) from err


def load_base_vision_tower(base: BaseCheckpoint) -> Any:
    """``CLIPVisionModelWithProjection`` of the base; pickled weights only through transformers' own loader."""
    from .clip import vision_tower_from

    return vision_tower_from(base.directory, use_safetensors=base.safetensors)


def load_base_clip(base: BaseCheckpoint) -> Any:
    """The base's full ``CLIPModel`` (text tower for zero-shot heads), read as :func:`load_base_vision_tower`."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(base.directory, use_safetensors=base.safetensors)


def base_state_dict(base: BaseCheckpoint) -> Mapping[str, Any]:
    """The base's weights under its checkpoint names: lazily from safetensors, else through transformers."""
    from .readers import open_checkpoint

    if base.safetensors:
        return open_checkpoint(base.directory, base.id)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base.directory, use_safetensors=False)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}

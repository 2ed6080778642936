"""The eight image-classification tasks of the merging benchmark, as data.

Class names and prompt templates are those of Ilharco et al., "Editing Models with Task Arithmetic"
(ICLR 2023, repo mlfoundations/task_vectors); they are stored as JSON in ``tasks/data/``. Label
order follows the Hub datasets (the same order FusionBench pairs with these names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TASKS", "TaskSpec", "fill_template", "get_task", "register_task", "TASK_SPEC_FILE"]

_DATA_DIR = Path(__file__).parent / "data"
TASK_SPEC_FILE = "task_spec.json"

Template = str | Callable[[str], str]


def fill_template(template: Template, classname: str) -> str:
    """One prompt: a ``'{}'`` format string or a callable, applied to a class name."""
    return template.format(classname) if isinstance(template, str) else template(classname)


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: where its data lives, its columns, class names and prompt templates."""

    name: str
    dataset_id: str
    classnames: tuple[str, ...]
    templates: tuple[Template, ...]
    config: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # freeze lists given by callers so the spec stays hashable and immutable
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "templates", tuple(self.templates))
        if not self.classnames:
            raise ValueError(f"task {self.name!r} has no class names; give at least one.")
        if not self.templates:
            raise ValueError(f"task {self.name!r} has no prompt templates; give e.g. ['a photo of a {{}}.'].")
        for template in self.templates:
            if isinstance(template, str) and "{}" not in template:
                raise ValueError(
                    f"task {self.name!r}: template {template!r} has no '{{}}' placeholder for the class name."
                )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        """Every template filled with ``classname`` (format strings or callables)."""
        return [fill_template(t, classname) for t in self.templates]

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TaskSpec:
        """Read a spec from a ``task_spec.json`` (keys: the field names; templates as '{}' strings)."""
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown task spec keys {unknown}; valid keys are {sorted(known)}.")
        missing = sorted({"name", "classnames", "templates"} - set(data))
        if missing:
            raise ValueError(f"{path}: task spec lacks {missing}; add them (templates like 'a photo of a {{}}.').")
        data.setdefault("dataset_id", f"local/{data['name']}")
        return cls(**data)

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready dict (callable templates cannot be written and raise)."""
        if not all(isinstance(t, str) for t in self.templates):
            raise ValueError(f"task {self.name!r} has callable templates, which cannot be written as JSON.")
        return {
            "name": self.name,
            "dataset_id": self.dataset_id,
            "config": self.config,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "train_split": self.train_split,
            "test_split": self.test_split,
            "classnames": list(self.classnames),
            "templates": list(self.templates),
        }


class TaskRegistry(Mapping[str, TaskSpec]):
    """Task name → spec, with case-insensitive lookup and an error that lists the known tasks."""

    def __init__(self) -> None:
        self._specs: dict[str, TaskSpec] = {}

    def _key(self, name: str) -> str | None:
        lowered = name.lower()
        return next((k for k in self._specs if k.lower() == lowered), None)

    def __getitem__(self, name: str) -> TaskSpec:
        key = self._key(name) if isinstance(name, str) else None
        if key is None:
            raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(self._specs)} (case-insensitive).")
        return self._specs[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"TaskRegistry({list(self._specs)})"

    def register(self, spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
        existing = self._key(spec.name)
        if existing is not None and not overwrite:
            raise ValueError(f"task {spec.name!r} is already registered; pass overwrite=True to replace it.")
        if existing is not None:
            del self._specs[existing]
        self._specs[spec.name] = spec
        return spec

    def unregister(self, name: str) -> TaskSpec:
        """Remove a task (e.g. a custom one added for a test) and return its spec."""
        spec = self[name]
        del self._specs[spec.name]
        return spec


def _builtin(name: str, dataset_id: str, data_file: str, config: str | None = None) -> TaskSpec:
    data = json.loads((_DATA_DIR / data_file).read_text())
    return TaskSpec(name, dataset_id, data["classnames"], data["templates"], config=config)


TASKS = TaskRegistry()
for _spec in (
    _builtin("Cars", "tanganke/stanford_cars", "stanford_cars.json"),
    _builtin("DTD", "tanganke/dtd", "dtd.json"),
    _builtin("EuroSAT", "tanganke/eurosat", "eurosat.json"),
    _builtin("GTSRB", "tanganke/gtsrb", "gtsrb.json"),
    _builtin("MNIST", "ylecun/mnist", "mnist.json", config="mnist"),
    _builtin("RESISC45", "tanganke/resisc45", "resisc45.json"),
    _builtin("SUN397", "tanganke/sun397", "sun397.json"),
    _builtin("SVHN", "ufldl-stanford/svhn", "svhn.json", config="cropped_digits"),
):
    TASKS.register(_spec)


def get_task(task: str | TaskSpec) -> TaskSpec:
    """The registered spec for a task name (case-insensitive); a ``TaskSpec`` is returned as is."""
    return task if isinstance(task, TaskSpec) else TASKS[task]


def register_task(spec: TaskSpec | Mapping[str, Any], *, overwrite: bool = False) -> TaskSpec:
    """Add a custom task (a ``TaskSpec`` or its fields as a dict) so ``load_task(name)`` finds it."""
    if not isinstance(spec, TaskSpec):
        spec = TaskSpec(**{"dataset_id": f"local/{spec['name']}", **dict(spec)})
    return TASKS.register(spec, overwrite=overwrite)


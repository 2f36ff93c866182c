"""Models served by name: each name has numbered versions, one of which serves new calls.

    name ──> versions {1: obj-a (draining), 2: obj-b (serving)}

A version is a loaded object (server.models.registry) that also answers to the name. Loading a
name again adds a version and makes it the serving one at once; the version it replaces
drains: calls already running on it finish there, and it is unloaded when the last one
ends (ModelService does that, it knows the calls in flight). A caller may pin a version
while it exists. Object ids stay valid for every version, so anything that takes an id
takes a name too.

Knows nothing of workers or gRPC: it is the table, and the rules for names. It labels each
version for the log (server.pool.object_labels), where the pool knows objects only by id.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from server.errors import InvalidArgument, NotFound, ObjectNotFound
from server.pool.object_labels import label_object, unlabel_object

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# Object ids are "obj-<16 hex>": a name may not start so, and one string never means both.
_OBJECT_ID_PREFIX = "obj-"


def check_name(name: str) -> str:
    """The name, if it may name a model; InvalidArgument saying why not otherwise."""
    if not NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"{name!r} is not a valid model name: 1 to 128 characters of letters, digits, '_', '.' and '-'"
        )
    if is_object_id(name):
        raise InvalidArgument(f"{name!r} is not a valid model name: {_OBJECT_ID_PREFIX!r} begins object ids")
    return name


def is_object_id(target: str) -> bool:
    """Whether a target names an object (by id) rather than a model."""
    return target.startswith(_OBJECT_ID_PREFIX)


@dataclass
class NamedModel:
    name: str
    versions: dict[int, str] = field(default_factory=dict)  # version -> object id, oldest first
    serving: int = 0  # the version new calls go to; 0 while none does
    last_version: int = 0  # versions are never reused, even after the ones before are gone

    @property
    def draining(self) -> list[int]:
        return [version for version in self.versions if version != self.serving]


class ModelNames:
    def __init__(self) -> None:
        self.models: dict[str, NamedModel] = {}
        self._name_of: dict[str, tuple[str, int]] = {}  # object id -> (name, version)

    def named(self, name: str) -> NamedModel:
        """A model by name, with its versions; NotFound if no version of it is loaded."""
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"no model {name!r} is loaded")
        return model

    def served(self) -> set[str]:
        """The names that have a serving version."""
        return {name for name, model in self.models.items() if model.serving}

    def resolve_target(
        self, target: str, version: int, objects: Container[str], why_gone: Callable[[str], str] = lambda _: ""
    ) -> str:
        """The object id an object id or a name (and version) stands for; objects: the ids
        loaded; why_gone: what a caller of an id no longer loaded is told."""
        if is_object_id(target):
            if version:
                raise InvalidArgument("a version can only be asked of a model name, not of an object id")
            if target not in objects:
                raise ObjectNotFound(target, why_gone(target))
            return target
        return self.resolve(target, version)

    def resolve(self, name: str, version: int = 0) -> str:
        """The object id that serves name (or its pinned version); NotFound naming what is missing."""
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"no model {name!r} is loaded")
        if version == 0:
            if not model.serving:
                raise NotFound(f"model {name!r} has no serving version")
            return model.versions[model.serving]
        object_id = model.versions.get(version)
        if object_id is None:
            loaded = ", ".join(str(v) for v in model.versions) or "none"
            raise NotFound(f"model {name!r} has no version {version} (loaded: {loaded})")
        return object_id

    def add_version(self, name: str, object_id: str) -> tuple[int, str | None]:
        """Serve object_id as name's next version; returns it and the object it replaced (now draining)."""
        model = self.models.setdefault(name, NamedModel(name))
        model.last_version += 1
        version = model.last_version
        replaced = model.versions.get(model.serving) if model.serving else None
        model.versions[version] = object_id
        model.serving = version
        self._name_of[object_id] = (name, version)
        label_object(object_id, name, version)
        return version, replaced

    def is_draining(self, object_id: str) -> bool:
        named = self._name_of.get(object_id)
        return named is not None and self.models[named[0]].serving != named[1]

    def objects_of(self, name: str) -> list[str]:
        model = self.models.get(name)
        return list(model.versions.values()) if model is not None else []

    def forget_object(self, object_id: str) -> None:
        """An object is gone: drop its version. If it served, none does until the name is loaded
        again (an older, draining version is not brought back); a name with no version left is gone."""
        named = self._name_of.pop(object_id, None)
        if named is None:
            return
        unlabel_object(object_id)
        name, version = named
        model = self.models[name]
        del model.versions[version]
        if model.serving == version:
            model.serving = 0
        if not model.versions:
            del self.models[name]

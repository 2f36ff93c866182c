"""A model repository entry (`models:` in the config): the model's name and where it comes from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelEntry:
    """One model of the repository (`models:` in the config): served by name from a package."""

    name: str
    package: str  # a path inside packages.directory
    module: str
    file: str

"""What the daemon's log calls a loaded object: its model's name and version where it has one.

The pool knows objects only by id ("obj-1f2e..."), which tells a person reading the log of a
hung call, or a worker's output, nothing; the models room (server.models.names) labels each
version as it is served by name and drops the label when the version is gone. One table for
the process, as the log it serves is one.
"""

from __future__ import annotations

_labels: dict[str, str] = {}


def label_object(object_id: str, model: str, version: int) -> None:
    _labels[object_id] = f"model {model} v{version}"


def unlabel_object(object_id: str) -> None:
    _labels.pop(object_id, None)


def object_label(object_id: str) -> str:
    """ "model seed v2" for a version of a named model; "" for an object with no name."""
    return _labels.get(object_id, "")

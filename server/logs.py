"""The daemon's log format: plain lines or one JSON object per line (server.log_format).

A record may carry structured fields (`extra={"fields": {...}}`, as the per-call line
does): plain appends them as key=value, JSON puts them at the top level.
"""

from __future__ import annotations

import json
import logging
from typing import Any

_PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_PLAIN)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_format(log_format: str) -> None:
    """Give every handler of the root logger the configured format."""
    formatter = JsonFormatter() if log_format == "json" else PlainFormatter()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)

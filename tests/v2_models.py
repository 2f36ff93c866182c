"""The `models:` entries the KServe v2 tests serve (gRPC, HTTP, and their fuzzers), from the
session's test packages (tests/package_builder.py): each test module picks the ones it needs."""

from __future__ import annotations

from typing import Any

ECHO: dict[str, Any] = {"name": "echo", "package": "models.pt", "pickle": "models:echo.pkl"}
MANY: dict[str, Any] = {"name": "many", "package": "models.pt", "pickle": "models:many.pkl"}
COMPLEX: dict[str, Any] = {"name": "complex", "package": "models.pt", "pickle": "models:complex.pkl"}
# Declared inputs (matched by name, checked) and outputs, over `many` (it returns its inputs).
DECLARED: dict[str, Any] = {
    "name": "declared",
    "package": "models.pt",
    "pickle": "models:many.pkl",
    "inputs": [
        {"name": "image", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ],
    "outputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 2]}],
}
# A torch module (x * 2) with one declared input and a named output.
SCALED: dict[str, Any] = {
    "name": "scaled",
    "package": "models.pt",
    "pickle": "models:scale.pkl",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "doubled", "datatype": "FP32", "shape": [-1]}],
}

"""Export the seed model that the bundled config.yaml serves by name: python scripts/export_seed.py OUT.pt

torch::deploy's own example (two convolutions), packaged with torch.package. `make serve` runs
this once, into packages/seed.pt, before it starts the daemon; an existing file is left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.package import PackageExporter


def export(out: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.Conv2d(20, 64, 5), nn.ReLU())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    with PackageExporter(str(partial)) as exporter:
        exporter.extern("numpy.**")
        exporter.save_pickle("model", "model.pkl", model)
    partial.replace(out)  # never a half-written package where the daemon looks


if __name__ == "__main__":
    target = Path(sys.argv[1])
    if not target.exists():
        export(target)

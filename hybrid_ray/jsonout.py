"""One way to write a JSON result file (parents created, trailing newline)."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, data: object, indent: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, sort_keys=False) + "\n")
    return path

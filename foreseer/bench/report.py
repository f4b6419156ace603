"""Writing benchmark reports."""

import json


def write_json(report: dict, path: str | None) -> None:
    """Write the report as JSON to `path` (when one is given) and say where."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")

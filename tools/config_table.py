"""Print the README's table of every ggspeed ds_config key, from the pydantic models themselves.

python tools/config_table.py            # markdown table on stdout
python tools/config_table.py --check README.md   # exit 1 if the README's table is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ggspeed.config import GGSpeedConfig

BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value)}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append(f"| `{key}` | | {field.description or ann.__doc__ or ''} |")
            rows.extend(_rows(ann, key))
            continue
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {_default(field)} | {desc} |")
    return rows


def table() -> str:
    head = ["| key | default | meaning |", "|---|---|---|"]
    return "\n".join([BEGIN, *head, *_rows(GGSpeedConfig, "ggspeed"), END])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="README", help="fail if this file's table is stale")
    parser.add_argument("--write", metavar="README", help="replace this file's table in place")
    args = parser.parse_args()
    current = table()
    target = args.check or args.write
    if not target:
        print(current)
        return 0
    text = Path(target).read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        print(f"{target}: no {BEGIN} ... {END} markers")
        return 1
    found = text[start : end + len(END)]
    if args.write:
        Path(target).write_text(text.replace(found, current), encoding="utf-8")
    elif found != current:
        print(
            f"{target}: the ggspeed key table is stale; run tools/config_table.py --write {target}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

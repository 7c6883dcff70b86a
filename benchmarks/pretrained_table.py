#!/usr/bin/env python3
"""Write the table of the shipped models, and the commands that trained and tested them, into docs/pretrained.md
(between its ``pretrained-table`` markers), from ``lebm_zoo/weights/index.json`` and each entry's ``config.json``.

    python benchmarks/pretrained_table.py            # rewrite the table
    python benchmarks/pretrained_table.py --check    # exit 1 if the page is not current (tests/test_docs.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "pretrained.md"
START, END = "<!-- pretrained-table:start -->", "<!-- pretrained-table:end -->"


def render(page: str) -> str:
    """``page`` with the generated table between its markers."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from publish_pretrained import readme_table

    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{readme_table().strip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check that the page is current")
    a = p.parse_args(argv)
    page = PAGE.read_text()
    new = render(page)
    if a.check:
        if new != page:
            print(f"{PAGE} is not current: run python benchmarks/pretrained_table.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    print(f"wrote the table of the shipped models into {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Re-render the tables of BENCHMARKS.md from the JSON that ``anypool bench --json`` writes.

    python benchmarks/render.py                # rewrite the tables in BENCHMARKS.md
    python benchmarks/render.py --check        # exit 1 if a table differs from its JSON

A table is a fenced block right after a marker line
``<!-- anypool bench: FRAMEWORK from PATH -->``; it is replaced by ``anypool.bench.table``
of that framework's rows in ``PATH`` (relative to the repository root), so the numbers in
BENCHMARKS.md cannot drift from the recorded runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from anypool import bench

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- anypool bench: (\w+) from (\S+) -->\n```\n.*?\n```\n", re.M | re.S)


def rows(path: Path, framework: str) -> list[bench.Row]:
    names = {f.name for f in dataclasses.fields(bench.Row)}
    return [bench.Row(**{k: v for k, v in row.items() if k in names})
            for row in json.loads(path.read_text())["rows"] if row["framework"] == framework]


def render(text: str) -> str:
    def block(m: re.Match) -> str:
        framework, path = m.group(1), m.group(2)
        selected = rows(ROOT / path, framework)
        if not selected:
            raise SystemExit(f"render: no {framework} rows in {path}")
        return f"<!-- anypool bench: {framework} from {path} -->\n```\n{bench.table(selected)}\n```\n"

    return MARKER.sub(block, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table differs")
    parser.add_argument("--file", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    page = Path(args.file)
    text = page.read_text()
    if not MARKER.search(text):
        print(f"render: no `<!-- anypool bench: ... -->` marker in {page}", file=sys.stderr)
        return 1
    new = render(text)
    if args.check:
        if new != text:
            print(f"render: the tables in {page} differ from their JSON; run python benchmarks/render.py",
                  file=sys.stderr)
            return 1
        return 0
    page.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

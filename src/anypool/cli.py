"""The ``anypool`` command: ``explain``, ``check``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit code 2
        sys.stderr.write(f"anypool: error: {message}\n")
        raise SystemExit(2)


def _bench(args) -> int:
    from . import bench

    frameworks = args.framework or bench.FRAMEWORKS
    rows = bench.run(frameworks, device=args.device, repeats=args.repeats,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(bench.table(rows))
    if args.json:
        bench.write_json(rows, args.json)
    if args.png:
        bench.write_png(rows, args.png)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="anypool", description="Exact adaptive pooling: inspect windows, check backends, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("bench", help="time anypool against each framework's native adaptive pooling")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--framework", action="append", choices=["torch", "jax", "keras", "onnx"],
                   help="benchmark only this framework (repeatable; default: every installed one)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (the median is kept)")
    p.add_argument("--json", metavar="FILE", help="write the rows and the machine description as JSON")
    p.add_argument("--png", metavar="FILE", help="draw the speed-ups as a bar chart")
    p.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        sys.stderr.write(f"anypool: error: {e}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

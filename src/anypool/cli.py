"""The ``anypool`` command: ``explain``, ``check``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit code 2
        sys.stderr.write(f"anypool: error: {message}\n")
        raise SystemExit(2)


def _size(text: str) -> tuple[int, ...]:
    """``10`` or ``224x224`` -> a tuple of ints (argparse type)."""
    try:
        return tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a size like 10 or 224x224") from None


def _explain(args) -> int:
    from . import _args, _bins

    output_size = args.output_size[0] if len(args.output_size) == 1 else args.output_size  # "7" means 7 per axis
    axes = _bins.bins(args.input_size, output_size)
    if args.valid:  # one sample of a padded batch: its windows are those of its own (valid) size
        rank = len(axes)
        valid = args.valid * rank if len(args.valid) == 1 else args.valid
        spec = _args.pool_spec((1, 1, *(b.input_size for b in axes)), tuple(b.output_size for b in axes), rank)
        _args.check_valid_sizes((1, len(valid)), "int64", True, [valid], spec, "anypool explain")
        print(f"one sample valid over {'x'.join(map(str, valid))} of the padded "
              f"{'x'.join(str(b.input_size) for b in axes)}: positions past it are padding, never read")
        axes = tuple(_bins.axis_bins(v, b.output_size) for v, b in zip(valid, axes))
    for n, b in enumerate(axes):
        pool = b.fixed_pool
        kind = ("upsampling (windows repeat)" if b.is_upsampling else "global pool" if b.is_global
                else "downsampling")
        print(f"axis {n}: {b.input_size} -> {b.output_size}  {kind}; "
              f"equivalent fixed pool: {f'kernel={pool[0]}, stride={pool[1]}' if pool else 'none'}")
        lengths = sorted(set(b.lengths.tolist()))
        print(f"  window lengths {lengths}; overlapping neighbours: {int((b.overlaps > 0).sum())}")
        print(f"  {'j':>4} {'start':>6} {'end':>6} {'length':>6} {'overlap':>7}")
        overlaps = b.overlaps.tolist() + [0]
        for j, (start, end) in enumerate(b):
            print(f"  {j:>4} {start:>6} {end:>6} {end - start:>6} {overlaps[j]:>7}")
    if args.png:
        _draw_windows(axes, args.png)
        print(f"wrote {args.png}")
    return 0


def _draw_windows(axes, path: str, ax=None) -> None:
    """Draw each axis' windows as bars over the input grid (one row per output index)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    own = ax is None
    if own:
        fig, subplots = plt.subplots(len(axes), 1, figsize=(8, 1.2 + 0.25 * sum(b.output_size for b in axes)),
                                     squeeze=False)
        subplots = subplots[:, 0]
    else:
        subplots = [ax] * len(axes)
    for n, (b, sub) in enumerate(zip(axes, subplots)):
        for j, (start, end) in enumerate(b):
            sub.barh(j, end - start, left=start, height=0.8, color=f"C{j % 10}", alpha=0.7)
        sub.set_xlim(0, b.input_size)
        # a few round integer ticks: 600 -> 37 in the demo's narrow panel overlapped with a tick per 37
        sub.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        sub.grid(axis="x", alpha=0.3)
        sub.invert_yaxis()
        sub.set_title(f"axis {n}: {b.input_size} -> {b.output_size}", fontsize=9)
        sub.set_ylabel("output j")
    if own:
        subplots[-1].set_xlabel("input index")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class _Progress:
    """A one-line progress counter on stderr (only when it is a terminal or asked for)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.done, self.enabled = total, label, 0, enabled

    def __call__(self, *_):
        self.done += 1
        if self.enabled and (self.done == self.total or self.done % max(1, self.total // 20) == 0):
            end = "\n" if self.done == self.total else ""
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total}{end}")
            sys.stderr.flush()


def _check(args) -> int:
    from . import _harness

    cases = _harness.random_cases(args.cases, seed=args.seed, valid=0.2)  # one in five a padded batch
    columns = _harness.columns()
    if not columns:
        print("no backend besides the NumPy reference is installed: nothing to check")
        return 0
    print(f"{'column':<28} {'cases':>6} {'max error':>10} {'failures':>8}")
    failed = False
    for column in columns:
        progress = _Progress(len(cases), column.name, sys.stderr.isatty())
        report = _harness.check(column, cases, _harness.OPS + _harness.REDUCTIONS, progress=progress)
        failed |= bool(report.failures)
        print(f"{report.column:<28} {report.cases:>6} {report.max_error:>10.2e} {len(report.failures):>8}",
              flush=True)
        for failure in report.failures[: args.show]:
            print(f"    {failure}")
    print("FAILED" if failed else "all columns agree with the NumPy reference")
    return 1 if failed else 0


def _demo(args) -> int:
    import matplotlib
    import numpy as np

    from . import _bins, _harness
    from .backends import numpy as reference

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cbook

    photo = plt.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).astype(np.float32) / 255
    crop = photo[200:240, 190:230]  # a 40x40 detail of the face, for the upsampling case
    jobs = [("photo 600x512 -> 75x64 (divisible)", photo, (75, 64)),
            ("photo 600x512 -> 37x29 (non-divisible)", photo, (37, 29)),
            ("detail 40x40 -> 97x97 (upsampling)", crop, (97, 97))]
    columns = _harness.columns()
    print(f"{'job':<40} {'op':<9} " + " ".join(f"{c.name:>22}" for c in columns))
    failed = False
    pooled = []
    for title, image, size in jobs:
        x = image[None]  # (1, H, W, 3): channels_last, as images are stored
        case = _harness.Case(x.shape, size, "channels_last", "float32", "normal", 0)
        for op in ("avg", "argmax") + _harness.REDUCTIONS:
            cells = []
            for column in columns:
                if op not in column.ops or not column.supports(case, op):
                    cells.append("n/a")
                    continue
                xo = _harness.operand(case, x, op)
                err, problem = _harness.compare(case, op, column.run(case, xo, op), column.expected(case, xo, op))
                failed |= problem is not None
                cells.append(problem or ("exact" if err == 0 else f"agree ({err:.1e})"))
            print(f"{title:<40} {op:<9} " + " ".join(f"{c:>22}" for c in cells))
        pooled.append((title, reference.avg_pool(x, case.spec)[0], reference.max_pool(x, case.spec)[0]))

    fig, grid = plt.subplots(2, len(jobs) + 1, figsize=(4 * (len(jobs) + 1), 8))
    grid[0, 0].imshow(photo)
    grid[0, 0].set_title("input 600x512")
    _draw_windows(_bins.bins((600,), (37,)), "", ax=grid[1, 0])
    grid[1, 0].set_title("windows 600 -> 37 (rows)")
    for k, (title, avg, mx) in enumerate(pooled, start=1):
        grid[0, k].imshow(np.clip(avg, 0, 1), interpolation="nearest")
        grid[0, k].set_title(f"avg: {title}", fontsize=8)
        grid[1, k].imshow(np.clip(mx, 0, 1), interpolation="nearest")
        grid[1, k].set_title(f"max: {title}", fontsize=8)
    for a in grid[0]:
        a.axis("off")
    for a in grid[1, 1:]:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    print(f"wrote {args.output}")
    print("FAILED: a backend disagrees with the reference" if failed else "every backend agrees with the reference")
    return 1 if failed else 0


def _bench(args) -> int:
    from . import bench

    frameworks = args.framework or bench.FRAMEWORKS
    cases = [c for c in bench.SUITE if not args.only or any(s in c.label() for s in args.only)]
    if len(frameworks) > 1:
        rows = bench.run_isolated(frameworks, device=args.device, repeats=args.repeats, only=args.only)
    else:
        rows = bench.run(frameworks, device=args.device, repeats=args.repeats, cases=cases,
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

    p = sub.add_parser("explain", help="show the windows of an adaptive pool",
                       description="Show each axis' windows: anypool explain 10 7, anypool explain 224x224 7x7")
    p.add_argument("input_size", type=_size, help="input spatial size, e.g. 10 or 224x224")
    p.add_argument("output_size", type=_size, help="output spatial size, e.g. 7 or 7x7")
    p.add_argument("--png", metavar="FILE", help="also draw the windows over the input grid")
    p.add_argument("--valid", type=_size, metavar="SIZE",
                   help="the windows of one sample of a padded batch valid over SIZE (valid_sizes), e.g. 5x3")
    p.set_defaults(func=_explain)

    p = sub.add_parser("check", help="compare every installed backend with the NumPy reference")
    p.add_argument("--cases", type=int, default=300, help="number of random cases (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=5, help="failures listed per column")
    p.set_defaults(func=_check)

    p = sub.add_parser("demo", help="pool a photograph with every backend and compare")
    p.add_argument("--output", default="anypool-demo.png", help="the picture written (default anypool-demo.png)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="time anypool against each framework's native adaptive pooling")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--framework", action="append", choices=["torch", "jax", "keras", "onnx"],
                   help="benchmark only this framework (repeatable; default: every installed one)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (the median is kept)")
    p.add_argument("--only", action="append", metavar="TEXT",
                   help="run only the cases whose label contains TEXT (repeatable), e.g. '2048, 7, 7'")
    p.add_argument("--json", metavar="FILE", help="write the rows and the machine description as JSON")
    p.add_argument("--png", metavar="FILE", help="draw the speed-ups as a bar chart")
    p.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides the tables
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        sys.stderr.write(f"anypool: error: {e}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

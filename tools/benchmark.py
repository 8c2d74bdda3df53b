"""Speed and memory benchmarks: `python tools/benchmark.py NAME [options]`.

Each benchmark lives in tools/benchmarks/NAME.py with `add_arguments(parser)` and
`run(args)`; `python tools/benchmark.py --help` lists them. Benchmarks print numbers;
correctness lives in tests/.
"""

import argparse
import importlib
import pathlib
import sys

BENCHMARK_DIR = pathlib.Path(__file__).resolve().parent / "benchmarks"


def main(argv=None):
    sys.path.insert(0, str(BENCHMARK_DIR.parent))
    names = sorted(p.stem for p in BENCHMARK_DIR.glob("*.py") if not p.stem.startswith("_"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="name", required=True, metavar="NAME", help=", ".join(names))
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        subparser = subparsers.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

"""`python -m bench [NAME [OPTIONS]]`: runs every benchmark (bench/bench_<name>.py with a
`main()`), or the one named, each printing its table. Options after a benchmark's name go to
it, e.g. `python -m bench select --gateways 1000 --audit off`; `python -m bench NAME --help`.

Exit status 1 if any benchmark failed (the others still run).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# Run first, in this order; any other bench/bench_<name>.py with a main() runs after them.
KNOWN = ("heartbeats", "select", "distribution", "replay")


def _benchmarks() -> dict[str, str]:
    """name -> module, for every bench/bench_<name>.py (those of others included)."""
    found = {
        info.name.removeprefix("bench_"): f"bench.{info.name}"
        for info in pkgutil.iter_modules([str(Path(__file__).parent)])
        if info.name.startswith("bench_")
    }
    ordered = {name: found.pop(name) for name in KNOWN if name in found}
    return ordered | dict(sorted(found.items()))


BENCHMARKS = _benchmarks()


def _entry(name: str, module_name: str) -> Callable[[Sequence[str]], None] | None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    found = getattr(module, "main", None)
    if not callable(found):
        return None

    def run(argv: Sequence[str]) -> None:
        saved = sys.argv
        sys.argv = [f"python -m bench {name}", *argv]
        try:
            if inspect.signature(found).parameters:
                found(list(argv))
            else:
                found()  # a main() that parses sys.argv itself
        finally:
            sys.argv = saved

    return run


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv:
        name, rest = argv[0], list(argv[1:])
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
            return 2
        chosen = {name: rest}
    else:
        chosen = {name: [] for name in BENCHMARKS}
    failed = []
    for name, args in chosen.items():
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        try:
            run = _entry(name, BENCHMARKS[name])
            if run is None:
                print(f"({BENCHMARKS[name]} has no main(): skipped)")
                continue
            run(args)
        except (Exception, SystemExit) as exc:
            if isinstance(exc, SystemExit) and exc.code in (0, None):
                continue
            traceback.print_exc()
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - started:.0f}s ===", flush=True)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

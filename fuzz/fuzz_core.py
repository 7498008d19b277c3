"""atheris entry point at the core's bytes boundary.

The invariant and the input format live in ``examples/fuzz_harness.py`` (one place, also run by
the tests in random mode); this file only instruments the core and hands atheris the harness's
``test_one_input``.  Usage (see fuzz/README.md)::

    pip install atheris
    python fuzz/fuzz_core.py -max_total_time=60                      # fuzz for a minute
    python fuzz/fuzz_core.py fuzz/corpus -max_total_time=600         # with a seed corpus
    python fuzz/fuzz_core.py crash-0123abcd                          # replay one input
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

try:
    atheris = importlib.import_module("atheris")  # optional; typed as Any
except ImportError:  # pragma: no cover - atheris is optional
    sys.exit(
        "atheris is not installed: pip install atheris "
        "(or run: python examples/fuzz_harness.py --engine random)"
    )

with atheris.instrument_imports(include=["dsc_core"]):
    # Instrumented before the harness imports them: importing the package imports every
    # module of the core (the operation registry imports each protocol's operations).
    import dsc_core  # noqa: F401

import fuzz_harness


def main() -> None:
    atheris.Setup(sys.argv, fuzz_harness.test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

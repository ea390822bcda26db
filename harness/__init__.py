"""tinyhil: hardware-in-the-loop benchmarking for TinyML on the ESP32-S3.

The command line (`tinyhil`) and the pytest plugin are the usual way in. For analysing results in
a notebook, `load_results(run_dir)` and `load_layers(run_dir)` (harness.results) return a run's
rows and per-layer timings as pandas DataFrames.
"""

from __future__ import annotations

__all__ = ["load_layers", "load_results"]


def __getattr__(name: str):
    # Imported on first use: the CLI and the pytest plugin import this package and need no pandas.
    if name in __all__:
        from . import results

        return getattr(results, name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")

"""A run's results as pandas DataFrames, for notebooks and scripts.

    from harness import load_results, load_layers

    rows = load_results("results/seed/latest")          # one row per case (model x variant)
    rows.pivot_table(index="model", columns="quantization", values="latency_median_ms")
    layers = load_layers("results/seed/latest")         # one row per operator of each case
    layers.groupby("op")["time_us"].sum().sort_values()

Both read the run's results.json (a run directory or the file itself), the file every run writes
as it goes, so an interrupted run loads the rows it finished.
"""

from __future__ import annotations

import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from .report import CaseResult, layer_rows, read_results

# Per-sample data stays in results.json: a column of tuples helps nobody in a table.
_NOT_COLUMNS = ("layers", "latency_windows_ms", "regression_limits", "diagnoses", "divergence", "quantization_errors")
_NULLABLE = {int: "Int64", float: "Float64", bool: "boolean", str: "string"}


def _dtype(annotation: Any) -> str:
    """The nullable pandas dtype of a field annotated `T` or `T | None`; object for anything else."""
    kinds = [kind for kind in typing.get_args(annotation) or (annotation,) if kind is not type(None)]
    return _NULLABLE.get(kinds[0], "object") if len(kinds) == 1 else "object"


# From the field types, not from the values: a float column whose values happen to be whole numbers
# must not become an integer column.
RESULT_DTYPES = {"run_id": "string", **{name: _dtype(kind) for name, kind in typing.get_type_hints(CaseResult).items()
                                        if name not in _NOT_COLUMNS}}
LAYER_DTYPES = {"run_id": "string", "suite": "string", "case_id": "string", "model": "string", "variant": "string",
                "latency_kind": "string", "op_index": "Int64", "op": "string", "path": "string", "time_us": "Float64",
                "cycles": "Int64", "estimated_cycles": "Int64", "macs": "Int64", "macs_per_cycle": "Float64",
                "pie_efficiency": "Float64", "path_ceiling": "Float64", "ceiling_efficiency": "Float64"}


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """One row per case of the run in `run_dir` (a run directory or its results.json).

    Columns are the fields of `harness.report.CaseResult` (`model`, `variant`, `case_id`,
    `status`, `latency_median_ms`, `latency_kind`, `model_bytes`, `arena_bytes`, `board_accuracy`,
    `output_agreement`, ...), after `run_id`. Missing values are `<NA>` in nullable dtypes
    (`Int64`, `Float64`, `boolean`, `string`); `violations` is a tuple of strings per row.
    Raises `harness.errors.ResultsError` when there is no readable results file."""
    metadata, rows = read_results(Path(run_dir))
    records = []
    for row in rows:
        record = {name: value for name, value in asdict(row).items() if name not in _NOT_COLUMNS}
        record["violations"] = tuple(row.violations)
        records.append({"run_id": metadata.get("run_id", ""), **record})
    return pd.DataFrame.from_records(records, columns=list(RESULT_DTYPES)).astype(RESULT_DTYPES)


def load_layers(run_dir: str | Path) -> pd.DataFrame:
    """One row per operator of each case (the per-layer timing of layers.csv): `case_id`, `op_index`,
    `op`, `path` (the esp-nn or TFLM code path that runs it), `time_us`, `cycles`,
    `estimated_cycles` (the cost model's; on a measured run, what it predicted), `macs`,
    `macs_per_cycle`, `pie_efficiency` (share of the ESP32-S3's 16 int8 MAC/cycle SIMD peak),
    `path_ceiling` (the best MAC/cycle of the layer's code path) and `ceiling_efficiency` (share of
    that ceiling), with the run, suite, model and variant. Missing values are `<NA>`: layers without
    MACs have no ceiling, and runs written before paths were recorded have none of the four."""
    metadata, rows = read_results(Path(run_dir))
    suites = {row.case_id: row.suite for row in rows}
    records = [{"run_id": metadata.get("run_id", ""), "suite": suites[layer["case_id"]], **layer}
               for layer in layer_rows(rows)]
    return pd.DataFrame.from_records(records, columns=list(LAYER_DTYPES)).astype(LAYER_DTYPES)

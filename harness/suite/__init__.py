"""Suite files: YAML (safe-loaded) -> validated, typed `Suite` with one `Case` per model x variant.

Every error names the file, the line and the field. A variant whose field holds a list (a matrix,
e.g. `calibration_samples: [50, 500]`) expands into one case per value.

A suite is untrusted input. Names become directories (the suite's results), test ids and lines of
generated firmware sources (model and variant), so they are held to a safe character set. Relative
paths resolve against the suite file and must stay inside the suite's project (`project_root`);
absolute paths are the user's explicit choice. A `tflite:` file is parsed here, so a file that is
not a TFLite model stops validation rather than a run.
"""

from ..quantize import QUANTIZATIONS
from .checks import NAME_RULE, is_safe_name, project_root
from .parse import load_suite, parse_suite
from .spec import (
                   MATRIX_FIELDS,
                   PROFILES,
                   BoardSettings,
                   Case,
                   DatasetSpec,
                   LatencyWindows,
                   ModelSpec,
                   Suite,
                   Thresholds,
                   Training,
                   Variant,
)

__all__ = ["NAME_RULE", "MATRIX_FIELDS", "PROFILES", "QUANTIZATIONS", "BoardSettings", "Case", "DatasetSpec",
           "LatencyWindows", "ModelSpec", "Suite", "Thresholds", "Training", "Variant", "is_safe_name", "load_suite",
           "parse_suite", "project_root"]

"""Tools a user runs on their own runs and data, apart from the pipeline's stages and from the
experiments in ``benchmarks/`` (each of which produced a table of docs/results.md):

- ``mask_errors.py``: where a folder of pseudo masks goes wrong against the ground truth;
- ``stray_pixels.py``: how much of a class the predictions put far from the true class;
- ``refine_montage.py``: a picture of what refine sees and makes, one row per image;
- ``exit_cams.py``: every Self-Regulation exit's CAMs of a cam training state, scored;
- ``score_seg_on_train.py``: a finished seg network scored on the train split's masks.

Each runs as ``python tools/<name>.py --help`` and stops on bad input with one line
``error: ...`` and exit status 2.
"""
from __future__ import annotations

import sys


def report_error(error: Exception | str) -> int:
    """Prints ``error`` as one ``error: ...`` line on stderr; returns the exit status of bad input, 2."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2

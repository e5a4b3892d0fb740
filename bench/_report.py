"""The head every benchmark report starts with: what ran, when, and on what.

A number in ``bench/results`` is only worth what its context says, and on a
shared machine the load when it started is part of that context.

    from _report import header, settings
    report = {**header("vllm_cache", started), "settings": settings(args), "runs": runs}
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


def header(benchmark: str, started: float | None = None, load_at_start: tuple[float, ...] | None = None,
           **machine: object) -> dict:
    """``benchmark``, the command line, the start time (``started``, a
    ``time.time()``; now if None) and the machine: platform, CPUs, the load
    average at the start (``load_at_start``; read now if None) and any
    ``machine`` entries given (a device, library versions)."""
    load = load_at_start if load_at_start is not None else os.getloadavg()
    return {
        "benchmark": benchmark,
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in load], **machine},
    }


def settings(args: argparse.Namespace) -> dict:
    """The parsed command-line options as JSON values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

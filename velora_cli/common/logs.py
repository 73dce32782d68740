"""Quiet by default: what the libraries say (warnings, notices, progress bars) goes to a log file, not the terminal.

transformers, peft, accelerate, bitsandbytes, datasets and huggingface_hub each print to stderr on their own:
FutureWarnings (twice), tqdm "Loading weights" bars that fill non-TTY logs with carriage returns, bitsandbytes'
kernel notices. `configure` sends their loggers and Python's warnings to VELORA_CACHE/logs/velora.log (rotated)
and, for a finetune, RUN_DIR/velora.log too; `--verbose` (or VELORA_VERBOSE=1) also shows them on stderr, bars
included. velora's own output (tables, progress, the one error line) is unaffected.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LIBRARIES = ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "huggingface_hub", "torch",
             "safetensors", "filelock", "urllib3", "httpx", "py.warnings")  # fmt: skip
_FORMAT = logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")
_handlers: list[logging.Handler] = []  # ours, replaced on each configure (main() runs many times under tests)


def verbose_from_env() -> bool:
    return os.environ.get("VELORA_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def log_path() -> Path:
    from velora_cli.common.hub import cache_dir

    return cache_dir() / "logs" / "velora.log"


def _file_handler(path: Path) -> logging.Handler | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=5 << 20, backupCount=2, encoding="utf-8", delay=True
        )
    except OSError:  # a read-only home must not stop a command: the notices are only dropped
        return None
    handler.setFormatter(_FORMAT)
    return handler


def _attach(handlers: list[logging.Handler]) -> None:
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for old in _handlers:
            logger.removeHandler(old)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = False


def configure(verbose: bool = False, transformers_now: bool = True) -> None:
    """Route the libraries' warnings and notices to the log file (and, with `verbose`, to stderr as well).

    `transformers_now=False`: a command that may never load transformers (memory-estimate of a LLaMA-layout model)
    leaves its logging to `quiet_transformers`, called just before transformers is used (it takes ~1 s to import).
    """
    verbose = verbose or verbose_from_env()
    logging.captureWarnings(True)
    handlers = [h for h in (_file_handler(log_path()),) if h is not None]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    _attach(handlers)
    _handlers[:] = handlers
    for handler in handlers:
        handler.setLevel(logging.INFO if verbose else logging.WARNING)
    # Progress bars: the environment for libraries not imported yet, their switches for those already loaded.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if verbose else "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "0" if verbose else "1"
    import huggingface_hub.utils as hub_utils

    (hub_utils.enable_progress_bars if verbose else hub_utils.disable_progress_bars)()
    if "datasets" in sys.modules:
        import datasets

        (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()
    if transformers_now:
        quiet_transformers()


def quiet_transformers() -> None:
    """transformers' own stderr handler goes (ours print instead, to stderr too with verbose); its bars follow
    the verbose switch."""
    import transformers.utils.logging as hf_logging

    hf_logging.get_logger()  # makes transformers install its default handler now, so it can be removed
    hf_logging.disable_default_handler()
    (hf_logging.enable_progress_bar if shows_library_output() else hf_logging.disable_progress_bar)()


def shows_library_output() -> bool:
    """--verbose (or VELORA_VERBOSE) is on: library progress bars and notices go to stderr too."""
    return verbose_from_env() or any(type(h) is logging.StreamHandler for h in _handlers)


@contextmanager
def library_bars_to_log(what: str) -> Iterator[None]:
    """A library's own progress bar (plain tqdm, which no switch of that library turns off, e.g. transformers'
    GGUF dequantisation) goes to the log file instead of the terminal, with one line of ours in its place."""
    import io

    sys.stderr.write(f"{what}...\n")
    if shows_library_output():
        yield
        return
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        yield
    logging.getLogger("velora").info("%s: %s", what, captured.getvalue().strip().splitlines()[-1:] or "")


def import_datasets() -> Any:
    """`datasets`, without the stderr handler it adds to its logger on import (after `configure` ran): its errors,
    such as a corrupt parquet file's, would print beside velora's one error line. Ours, from `configure`, stay."""
    import datasets

    root = logging.getLogger("datasets")
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler and h not in _handlers]:
        root.removeHandler(handler)
    return datasets


@contextmanager
def also_to(path: Path) -> Iterator[None]:
    """Copy the libraries' log records into `path` (a run's own velora.log) for the block."""
    handler = _file_handler(path)
    if handler is None:
        yield
        return
    handler.setLevel(min((h.level for h in _handlers), default=logging.WARNING))
    for name in LIBRARIES:
        logging.getLogger(name).addHandler(handler)
    try:
        yield
    finally:
        for name in LIBRARIES:
            logging.getLogger(name).removeHandler(handler)
        handler.close()

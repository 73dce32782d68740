"""The error types every command raises, and the did-you-mean hint their messages share.

The CLI turns a VeloraError into one line on stderr and its exit code; nothing here imports the rest of velora_cli.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VeloraError(Exception):
    """A failure the user can act on. Printed as one line, no traceback."""

    exit_code = 1


class UsageError(VeloraError):
    """Bad command-line usage, recipe or input file: exit code 2 (the shell convention for usage errors)."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe field is missing, mistyped or inconsistent. The message names the file and field."""


class DataError(UsageError):
    """A dataset file is missing or a row is malformed. The message names the file and row."""


class HubUnavailable(UsageError):
    """A file must come from the Hugging Face hub, which is switched off (HF_HUB_OFFLINE) or unreachable."""


class TrainingAborted(VeloraError):
    """Training stopped for a reason the user must look at (non-finite loss, out of memory)."""


def did_you_mean(word: str, options: Iterable[str], cutoff: float = 0.6) -> str:
    """' (did you mean 'x'?)' for the closest of `options` to a misspelt `word`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def damaged_input_line(exc: BaseException) -> str | None:
    """One line for an error that reading a damaged or hostile file raised where no check caught it first (a
    safetensors header, a pickle torch refused, bytes that are not UTF-8), else None: the CLI prints it instead of a
    traceback. The checks before loading (rundir.verify, common.bounds) name the file; this is the net below them."""
    import pickle

    name = type(exc).__name__
    if name in ("SafetensorError", "HeaderTooLarge") or isinstance(exc, pickle.UnpicklingError):
        first = (str(exc).strip().splitlines() or [name])[0]
        return f"damaged or unsafe file ({name}): {first[:300]}"
    if isinstance(exc, UnicodeDecodeError):
        return f"input is not UTF-8 text (byte {exc.start}: {exc.reason})"
    return None

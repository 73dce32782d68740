"""The torch-free settings of lean activations: the parsed `checkpointing` choice (Recompute) and the chunked
loss's default chunk size. Kept apart from the torch code so the memory model and recipe checks can use them
without importing torch (seconds at a command's start)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

CHECKPOINTING_HELP = "none, all, mlp or every:K (K >= 1)"

# Budget for one chunk's fp32 logits when no chunk size is given: a chunk then holds about three times this
# transiently (logits, their fp32 copy / softmax, the gradient in the logits dtype), and the matmuls stay large
# enough to run at full speed. 32k vocabulary -> 1024 tokens, 49k -> 682, 128k -> 256.
DEFAULT_CHUNK_BYTES = 128 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that a chunk's fp32 logits take DEFAULT_CHUNK_BYTES."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab_size))


@dataclass(frozen=True)
class Recompute:
    """A parsed `checkpointing` setting: mode and, for every:K, K."""

    mode: Literal["none", "all", "every", "mlp"]
    every: int = 1

    def layers(self, num_layers: int) -> list[int]:
        """Indices of the decoder layers checkpointed as a whole."""
        if self.mode == "all":
            return list(range(num_layers))
        if self.mode == "every":
            return list(range(0, num_layers, self.every))
        return []

    def __str__(self) -> str:
        return f"every:{self.every}" if self.mode == "every" else self.mode


def parse_checkpointing(spec: str | bool | None) -> Recompute:
    """`none`/`all`/`mlp`/`every:K` (True/False/None accepted for all/none) -> Recompute; ValueError otherwise."""
    if spec is None or spec is False:
        return Recompute("none")
    if spec is True:
        return Recompute("all")
    text = str(spec).strip().lower()
    if text in ("none", "all", "mlp"):
        return Recompute(text)  # type: ignore[arg-type]
    match = re.fullmatch(r"every:(\d+)", text)
    if match and int(match.group(1)) >= 1:
        k = int(match.group(1))
        return Recompute("all") if k == 1 else Recompute("every", k)
    raise ValueError(f"checkpointing={spec!r}: expected {CHECKPOINTING_HELP}")

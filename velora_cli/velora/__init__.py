"""The engine's old import path, kept so scripts written for it still run: `velora_cli.velora` is
`velora_cli.engine`, `velora_cli.velora.lean` is `velora_cli.engine.lean`. New code imports velora_cli.engine."""

from velora_cli.engine import *  # noqa: F403
from velora_cli.engine import __all__, __getattr__  # noqa: F401

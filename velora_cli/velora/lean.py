"""The old import path of the lean activation techniques: see velora_cli.engine.lean."""

from velora_cli.engine.lean import *  # noqa: F403
from velora_cli.engine.lean import __all__  # noqa: F401

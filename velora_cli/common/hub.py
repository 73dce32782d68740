"""The Hugging Face hub: reached only when a file is not already cached, and never waited on.

transformers and datasets retry an unreachable hub for tens of seconds before they fail (27 s measured here for
one config.json), and a planning command such as `memory-estimate` must not need the network at all for a model
that is cached or well known. So every hub load goes through `from_pretrained_cached`: the local cache first
(`local_files_only=True`), then, only if that misses, one short TCP probe of the endpoint (or of the HTTPS proxy)
in a daemon thread, so a hung DNS lookup cannot stall it either; an unreachable hub, or `HF_HUB_OFFLINE=1` with
the files not cached, is one line naming the model within PROBE_SECONDS.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from velora_cli.common.errors import HubUnavailable

PROBE_SECONDS = 3.0

_TRUE = ("1", "true", "yes", "on")

_reachable: dict[str, str | None] = {}  # endpoint -> None when reachable, else why not (one probe per process)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def is_hub_id(reference: str) -> bool:
    """A reference that can only mean a hub repository: not an existing path, not a file-like name."""
    path = Path(reference).expanduser()
    return not path.exists() and not reference.startswith((".", "/", "~")) and reference.count("/") <= 1


def _probe(url: str) -> str | None:
    """None when a TCP connection to the endpoint (or the proxy in between) opens within PROBE_SECONDS."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else url)
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    result: list[str | None] = ["timed out"]

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            result[0] = None
        except OSError as exc:
            result[0] = exc.strerror or type(exc).__name__

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    return result[0]


def require_hub(what: str) -> None:
    """HubUnavailable (a UsageError), at once, when `what` would have to come from a hub that is off or unreachable."""
    if offline():
        raise HubUnavailable(f"{what}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
    url = endpoint()
    if url not in _reachable:
        _reachable[url] = _probe(url)
    if _reachable[url] is not None:
        raise HubUnavailable(
            f"{what}: not in the local Hugging Face cache, and {url} cannot be reached ({_reachable[url]}); "
            "connect, or set HF_HUB_OFFLINE=1 to work from the cache"
        )


def from_pretrained_cached(loader: Callable[..., Any], path: str, what: str, **kwargs: Any) -> Any:
    """`loader(path, **kwargs)` (a from_pretrained), from the local cache when it can, else from a reachable hub."""
    if not is_hub_id(path):
        return loader(path, **kwargs)
    try:
        return loader(path, local_files_only=True, **kwargs)
    except OSError:
        require_hub(what)
    return loader(path, **kwargs)


def cache_dir() -> Path:
    root = os.environ.get("VELORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "velora")
    return Path(root)

"""The Hugging Face hub, seen from here: offline switches, and one quick look whether it can be reached.

huggingface_hub and datasets retry an unreachable hub for tens of seconds, printing every attempt; stade
looks once (a TCP connection to the endpoint, a few seconds at most) and then either uses the local cache
or fails with one line naming the local alternatives.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def offline(*variables: str) -> bool:
    """Whether one of the offline switches (``HF_HUB_OFFLINE`` and the given ones) is set."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", *variables))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def reachable(timeout: float = 5.0) -> bool:
    """One TCP connection to the hub's host and port."""
    url = urlparse(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False

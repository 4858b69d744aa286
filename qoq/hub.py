"""Is the Hugging Face hub reachable? One quick, cached probe that never hangs long."""

from __future__ import annotations

import functools
import os
import threading
import urllib.error
import urllib.request

_TRUE = {"1", "true", "yes", "on"}


def hub_offline_by_env() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=None)
def _probe(url: str, timeout: float) -> bool:
    result = [False]

    def head() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "qoq"})
            with urllib.request.urlopen(req, timeout=timeout):
                result[0] = True
        except urllib.error.HTTPError:
            result[0] = True  # the server answered (even 4xx/5xx): the network path works
        except Exception:
            result[0] = False

    # urlopen's timeout does not cover DNS resolution, so bound the whole probe with a thread.
    t = threading.Thread(target=head, name="qoq-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0] if not t.is_alive() else False


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when https://huggingface.co (or $HF_ENDPOINT) answers an HTTPS HEAD within `timeout` s.

    False at once when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set. The network answer is cached
    for the process; `hub_reachable.cache_clear()` forgets it.
    """
    if hub_offline_by_env():
        return False
    return _probe(hub_endpoint(), float(timeout))


hub_reachable.cache_clear = _probe.cache_clear  # type: ignore[attr-defined]

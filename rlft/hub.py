"""Is the model hub reachable? Asked once per process, in a few seconds, before the first hub name loads.

Without this, an unreachable hub costs about a minute of huggingface_hub's retries (and a screen of
their log lines) before a model or dataset name can be called unknown. When the probe fails, the
process switches the HF libraries to offline mode, so names already in the local cache still load.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def offline() -> bool:
    """True when HF_HUB_OFFLINE is set, or the hub endpoint does not answer a TCP connect."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return True
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        return False
    except OSError as e:
        log.warning("the hub (%s) is unreachable (%s): working offline, from the local cache only",
                    endpoint.hostname, e.strerror or type(e).__name__)
        go_offline()
        return True


def go_offline() -> None:
    """Offline mode for this process: the libraries read HF_HUB_OFFLINE once, at import."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass


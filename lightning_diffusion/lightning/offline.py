"""Whether a server can be reached, decided in bounded time: what lets every download path fail fast offline."""

import contextlib
import os
import socket
from urllib.parse import urlparse

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` s (True behind an HTTPS proxy, which decides).

    A direct connection would fail behind a proxy even when the server is reachable through it.
    """
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return True
    parsed = urlparse(url)
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is out of reach: HF_HUB_OFFLINE set, or no connection within seconds."""
    import datasets
    import huggingface_hub.constants

    return (os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
            or datasets.config.HF_HUB_OFFLINE or not reachable(huggingface_hub.constants.ENDPOINT))


@contextlib.contextmanager
def hub_access(what: str, local_hint: str):
    """Run a Hugging Face Hub load online, or offline from the local cache, failing at once (naming `local_hint`)
    instead of after the HTTP client's retries when `what` is not cached."""
    import datasets
    import huggingface_hub.constants

    if not hub_offline():
        yield
        return
    # datasets and huggingface_hub read these flags at import; set them so this load uses the cache only
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    except Exception as e:
        raise ConnectionError(f"cannot load {what}: offline (HF_HUB_OFFLINE=1 or no network) and not in the local "
                              f"cache ({type(e).__name__}: {e}). Use a local copy instead: {local_hint}") from e
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved

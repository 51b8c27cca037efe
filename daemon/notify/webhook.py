"""The webhook sink: each notice POSTed as JSON (or Slack-compatible ``{"text": ...}``), signed.

With ``secret_file``, the body is signed with HMAC-SHA256 under that key and
the signature sent as ``X-Baton-Signature: sha256=<hex>`` (the receiver
recomputes it over the raw body; the body's ``at`` lets it refuse replays).
The key is read once, at start; an unreadable or empty key file is a
``ConfigError`` naming ``notify.N.secret_file``.

The only module that imports httpx (import-linter). Never puts the URL's
path or query in a log line, an error or a metric label (a Slack hook's path
is its secret): the sink is named ``webhook:<host>``. A response body is never
read into an error. Redirects are not followed (a 3xx is a failed attempt).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from urllib.parse import urlsplit

import httpx

from daemon import __version__
from daemon.config import WebhookNotifyConfig
from daemon.errors import ConfigError, NotifyError
from daemon.notify.base import Notice

# httpx logs every request at INFO with its full URL: a Slack hook's secret path in our logs. Quiet it.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

SIGNATURE_HEADER = "X-Baton-Signature"
EVENT_HEADER = "X-Baton-Event"
MAX_KEY = 4096


def sign(key: bytes, body: bytes) -> str:
    """The ``X-Baton-Signature`` value of ``body`` under ``key``."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def read_key(spec: WebhookNotifyConfig, where: str = "notify") -> bytes | None:
    if spec.secret_file is None:
        return None
    try:
        with open(spec.secret_file, "rb") as f:
            key = f.read(MAX_KEY + 1).strip()
    except OSError as e:
        raise ConfigError([f"{where}.secret_file: cannot read {spec.secret_file}: {e.strerror}"]) from None
    if not key or len(key) > MAX_KEY:
        raise ConfigError([f"{where}.secret_file: {spec.secret_file} must hold a key of 1 to {MAX_KEY} bytes"])
    return key


def body_of(notice: Notice, fmt: str) -> bytes:
    if fmt == "slack":
        # Slack reads <!channel>, <@user> and <url|text> in text: a node name, an exe path or a
        # caller's reason must not ping a channel or plant a link. Slack's own escapes, only these three.
        text = notice.text().replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        data: object = {"text": text}
    else:
        data = notice.as_dict()
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


class WebhookSink:
    def __init__(self, spec: WebhookNotifyConfig) -> None:
        self.spec = spec
        self.key = read_key(spec)
        parts = urlsplit(spec.url)
        self.name = f"webhook:{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        self._client = httpx.AsyncClient(timeout=spec.timeout, follow_redirects=False, trust_env=False)

    async def send(self, notice: Notice) -> None:
        body = body_of(notice, self.spec.format)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"baton/{__version__}",
            EVENT_HEADER: notice.event,
        }
        if self.key is not None:
            headers[SIGNATURE_HEADER] = sign(self.key, body)
        try:
            # httpx's timeout bounds each read, not the attempt: a hook trickling its answer would hold it.
            async with asyncio.timeout(self.spec.timeout):
                response = await self._client.post(self.spec.url, content=body, headers=headers)
        except TimeoutError:
            raise NotifyError(f"{self.name}: timed out after {self.spec.timeout:g}s") from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
            # ValueError: a host httpx cannot encode (IDNA) fails each attempt; it must not end the lane.
            raise NotifyError(f"{self.name}: {type(e).__name__}") from None
        if not 200 <= response.status_code < 300:
            raise NotifyError(f"{self.name}: HTTP {response.status_code}")

    async def aclose(self) -> None:
        await self._client.aclose()

"""API keys: every route but ``/health`` needs ``Authorization: Bearer KEY`` (as OpenAI's clients send
it) once the server is given keys (``--api-key``, or ``INNSTEER_API_KEY``, comma-separated)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable, Sequence

from ..core.errors import ConfigError

ENV_VAR = "INNSTEER_API_KEY"
OPEN_PATHS = ("/health",)  # load balancers probe it without credentials


def api_keys(given: Sequence[str], environment: str | None) -> tuple[str, ...]:
    """The keys from the command line and the environment variable's comma-separated list."""
    keys = [*given, *(environment or "").split(",")]
    keys = [key.strip() for key in keys if key.strip()]
    for key in keys:
        if any(c.isspace() or not c.isprintable() for c in key):
            raise ConfigError("an API key must be printable characters without spaces")
    return tuple(dict.fromkeys(keys))


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _digest(key: bytes) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever the key's length.
    return hashlib.sha256(key).digest()


class ApiKeyMiddleware:
    """An ASGI middleware answering 401 (OpenAI's error shape) to a request without a valid key."""

    def __init__(self, app, keys: Iterable[str]):
        self.app = app
        self.digests = [_digest(key.encode()) for key in keys]

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        values = [value for name, value in headers if name.lower() == b"authorization"]
        scheme, _, token = (values[0] if values else b"").partition(b" ")
        given = _digest(token.strip())
        matched = False
        for digest in self.digests:  # every key compared: the time does not say which one matched
            matched |= hmac.compare_digest(given, digest)
        return matched and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope["headers"]):
            return await self.app(scope, receive, send)
        body = {
            "error": {
                "message": "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

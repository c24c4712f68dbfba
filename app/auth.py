"""Optional API keys for the prediction endpoints (``SENTIMENT_API_KEY`` / ``SENTIMENT_API_KEYS_FILE``).

With no key configured the endpoints are open. With keys, ``POST /v1/predict`` and the v2 ``infer``
endpoints need ``Authorization: Bearer <key>``; health, metrics, metadata and the viewer's static
page stay open (probes and scrapers carry no secrets). Keys are compared in constant time and are
never logged. TLS is the ingress's job (docs/api.md, "API keys").
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from app.edge import send_error
from app.errors import ApiError, Errors
from app.metrics import ServiceMetrics


def load_keys(key: str | None, keys_file: Path | None) -> tuple[bytes, ...]:
    """The accepted keys, as SHA-256 digests: one from the variable, and one per non-empty,
    non-comment line of the file (list the new key beside the old one, restart, then drop the old
    one: keys are read at start-up). Surrounding whitespace is ignored; keys are ASCII (HTTP headers)."""
    if key is not None and not key.strip():  # e.g. an unset ${VAR} in a compose file
        raise ValueError("SENTIMENT_API_KEY is set but blank; unset it to run without keys")
    keys = [key.strip()] if key else []  # a secret made from a file often ends in a newline
    if keys_file is not None:
        from_file = [line.strip() for line in keys_file.read_text(encoding="utf-8").splitlines()
                     if line.strip() and not line.strip().startswith("#")]
        if not from_file:  # a configured but empty file must not leave the endpoints open
            raise ValueError(f"SENTIMENT_API_KEYS_FILE ({keys_file}) holds no key")
        keys += from_file
    return tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in keys)


def check_bearer(authorization: str | None, digests: tuple[bytes, ...]) -> None:
    """Raise 401 unless the header carries one of the keys. Every key is compared (no early exit),
    each by its digest with :func:`hmac.compare_digest`, so timing says nothing about any key."""
    if not digests:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(Errors.UNAUTHORIZED, detail="this endpoint needs 'Authorization: Bearer <API key>'")
    offered = hashlib.sha256(token.strip().encode("utf-8")).digest()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(offered, digest)
    if not matched:
        raise ApiError(Errors.UNAUTHORIZED, detail="the API key is not valid")


# The prediction endpoints: POST /v1/predict and the v2 infer endpoints (with or without a version).
PROTECTED_PATHS = re.compile(r"/v1/predict|/v2/models/[^/]+(?:/versions/[^/]+)?/infer")


class ApiKeyGate:
    """Pure ASGI middleware in front of the body limit: a prediction request without a valid key is
    answered 401 before a byte of its body is read. Does nothing when no key is configured."""

    def __init__(self, app: ASGIApp, digests: tuple[bytes, ...], metrics: ServiceMetrics) -> None:
        self.app, self.digests, self.metrics = app, digests, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (self.digests and scope["type"] == "http" and scope.get("method") == "POST"
                and PROTECTED_PATHS.fullmatch(path)):
            authorization = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                                  if k == b"authorization"), None)
            try:
                check_bearer(authorization, self.digests)
            except ApiError as error:
                await send_error(scope, receive, send, error, self.metrics)
                return
        await self.app(scope, receive, send)

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


def load_keys(key: str | None, keys_file: Path | None,
              names: tuple[str, str] = ("SENTIMENT_API_KEY", "SENTIMENT_API_KEYS_FILE")) -> tuple[bytes, ...]:
    """The accepted keys, as SHA-256 digests: one from the variable, and one per non-empty,
    non-comment line of the file (list the new key beside the old one, restart, then drop the old
    one: keys are read at start-up). Surrounding whitespace is ignored; keys are ASCII (HTTP headers).
    ``names`` are the two settings, for messages (prediction keys, or admin keys)."""
    if key is not None and not key.strip():  # e.g. an unset ${VAR} in a compose file
        raise ValueError(f"{names[0]} is set but blank; unset it to run without keys")
    keys = [key.strip()] if key else []  # a secret made from a file often ends in a newline
    if keys_file is not None:
        from_file = [line.strip() for line in keys_file.read_text(encoding="utf-8").splitlines()
                     if line.strip() and not line.strip().startswith("#")]
        if not from_file:  # a configured but empty file must not leave the endpoints open
            raise ValueError(f"{names[1]} ({keys_file}) holds no key")
        keys += from_file
    return tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in keys)


def _offered(authorization: str | None, what: str) -> bytes:
    """The digest of the bearer token in ``authorization``; 401 when there is none."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(Errors.UNAUTHORIZED, detail=f"this endpoint needs 'Authorization: Bearer <{what}>'")
    return hashlib.sha256(token.strip().encode("utf-8")).digest()


def _matches(offered: bytes, digests: tuple[bytes, ...]) -> bool:
    """Every key is compared (no early exit), each by its digest with :func:`hmac.compare_digest`,
    so timing says nothing about any key."""
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(offered, digest)
    return matched


def check_bearer(authorization: str | None, digests: tuple[bytes, ...]) -> None:
    """Raise 401 unless the header carries one of the keys (no keys: nothing to check)."""
    if not digests:
        return
    if not _matches(_offered(authorization, "API key"), digests):
        raise ApiError(Errors.UNAUTHORIZED, detail="the API key is not valid")


def check_admin(authorization: str | None, admin: tuple[bytes, ...], prediction: tuple[bytes, ...]) -> None:
    """Raise unless the header carries an admin key: 401 without a valid key, 403 for a prediction key
    (a valid credential without the right; it never opens the model repository)."""
    offered = _offered(authorization, "admin key")
    if _matches(offered, admin):
        return
    if _matches(offered, prediction):
        raise ApiError(Errors.FORBIDDEN, detail="a prediction key does not open the model repository; use an admin key")
    raise ApiError(Errors.UNAUTHORIZED, detail="the admin key is not valid")


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

"""Optional API keys for the prediction endpoints (``SENTIMENT_API_KEY`` / ``SENTIMENT_API_KEYS_FILE``).

With no key configured the endpoints are open. With keys, ``POST /v1/predict`` and the v2 ``infer``
endpoints need ``Authorization: Bearer <key>``; health, metrics, metadata and the viewer's static
page stay open (probes and scrapers carry no secrets). Keys are compared in constant time and are
never logged. TLS is the ingress's job (README, "Deployment").
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from fastapi import Request

from app.errors import ApiError, Errors


def load_keys(key: str | None, keys_file: Path | None) -> tuple[bytes, ...]:
    """The accepted keys, as SHA-256 digests: one from the variable, and one per non-empty,
    non-comment line of the file (so that a key can be rotated by adding the new one first)."""
    keys = [key] if key else []
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


async def require_api_key(request: Request) -> None:
    """FastAPI dependency of the prediction endpoints; runs before the body is read or parsed."""
    check_bearer(request.headers.get("authorization"), request.app.state.api_keys)

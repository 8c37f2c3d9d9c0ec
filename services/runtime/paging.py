"""Opaque page tokens (AIP-158): keyset positions bound to the query that issued them.

The one page-token design every List RPC uses (registry, batch, router admin): the token carries the
position to continue after (any JSON value: a name, a number, a (time, id) pair) and a fingerprint of
the list and its filters, so a token cannot be replayed against another list or another filter.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from services.runtime.errors import InvalidArgument

# Bumped if the token layout changes, so old tokens fail cleanly instead of being misread.
_TOKEN_VERSION = 1


def _fingerprint(query: dict[str, Any]) -> str:
    # A token is only valid for the same list with the same filters (AIP-158).
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def encode_page_token(after: Any, query: dict[str, Any]) -> str:
    """Token for the page after the item keyed `after`, for the list described by `query`."""
    raw = json.dumps({"v": _TOKEN_VERSION, "a": after, "q": _fingerprint(query)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, query: dict[str, Any]) -> Any:
    """The position to continue after; None for the first page. Foreign or damaged tokens are
    INVALID_ARGUMENT; so is a token whose position the caller cannot use (`bad_position`)."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = data["a"]
        valid = data.get("v") == _TOKEN_VERSION and after is not None and not isinstance(after, bool)
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        valid = False
    if not valid:
        raise InvalidArgument(
            "page_token is not a token this list issued", field_violations=[("page_token", "invalid")]
        )
    if data.get("q") != _fingerprint(query):
        raise InvalidArgument(
            "page_token was issued for a different list or filter",
            field_violations=[("page_token", "does not match this request's filters")],
        )
    return after


def bad_position() -> InvalidArgument:
    """For a decoded position of the wrong shape (a token forged with a valid layout)."""
    return InvalidArgument("page_token is not a token this list issued", field_violations=[("page_token", "invalid")])

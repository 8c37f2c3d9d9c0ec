"""Unit tests for the registry's opaque page tokens."""

from __future__ import annotations

import base64
import json

import pytest

from services.runtime.errors import InvalidArgument
from services.runtime.paging import decode_page_token, encode_page_token

QUERY = {"list": "versions", "model": "digits", "stage": None}


def test_round_trip_and_first_page() -> None:
    assert decode_page_token("", QUERY) is None
    assert decode_page_token(encode_page_token(17, QUERY), QUERY) == 17
    assert decode_page_token(encode_page_token("resnet18", {"list": "models"}), {"list": "models"}) == "resnet18"


def test_token_is_opaque_url_safe_text() -> None:
    token = encode_page_token("a/b+c", QUERY)
    assert "digits" not in token and "=" not in token
    assert all(c.isalnum() or c in "-_" for c in token)


def test_token_for_another_list_or_filter_is_refused() -> None:
    token = encode_page_token(17, QUERY)
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(token, {**QUERY, "stage": 3})
    assert caught.value.field_violations[0][0] == "page_token"
    with pytest.raises(InvalidArgument):
        decode_page_token(token, {"list": "models"})


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        "%%%",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(json.dumps({"v": 99, "a": 1, "q": "x"}).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps({"v": 1, "a": True, "q": "x"}).encode()).decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
def test_damaged_tokens_are_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument):
        decode_page_token(token, QUERY)


def test_any_json_position_round_trips_and_a_bool_is_refused() -> None:
    # Batch pages jobs after a (create_time, job_id) pair.
    pair = ["2026-12-01T20:00:00+00:00", "0b6c2d1e-1111-4222-8333-944455556666"]
    assert decode_page_token(encode_page_token(pair, QUERY), QUERY) == pair
    with pytest.raises(InvalidArgument):
        decode_page_token(encode_page_token(True, QUERY), QUERY)

"""Protobuf wire splicing for ModelInfer: read and replace model_name/model_version without touching tensors."""

# ModelInferRequest and ModelInferResponse both start with model_name = 1 and model_version = 2
# (strings), and protobuf serializers write fields in number order, so those two sit at the front
# of every message a normal client sends. Reading them is a few byte comparisons; replacing them is
# one concatenation, and the tensor payload (raw_input_contents, up to megabytes) is never decoded.

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_NAME_TAG = 0x0A  # field 1, wire type 2 (length-delimited)
_VERSION_TAG = 0x12  # field 2, wire type 2


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_head(name: str, version: str) -> bytes:
    """The leading fields 1 and 2 as a serializer would write them (empty strings are omitted)."""
    head = b""
    if name:
        raw = name.encode()
        head += bytes([_NAME_TAG]) + encode_varint(len(raw)) + raw
    if version:
        raw = version.encode()
        head += bytes([_VERSION_TAG]) + encode_varint(len(raw)) + raw
    return head


def read_head(data: bytes) -> tuple[str, str, int] | None:
    """(model_name, model_version, offset of the rest) when the message starts with field 1, else None.

    None means the fields are not at the front (a hand-rolled encoder, or an empty model_name):
    the caller falls back to a full parse.
    """
    if not data or data[0] != _NAME_TAG:
        return None
    try:
        # Names are short: a one-byte length is the rule, the general varint the exception.
        length = data[1]
        length, pos = (length, 2) if length < 0x80 else _varint(data, 1)
        end = pos + length
        if end > len(data):
            return None
        name = data[pos:end].decode()
        version = ""
        if end < len(data) and data[end] == _VERSION_TAG:
            length = data[end + 1]
            length, pos = (length, end + 2) if length < 0x80 else _varint(data, end + 1)
            vend = pos + length
            if vend > len(data):
                return None
            version = data[pos:vend].decode()
            end = vend
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    return name, version, end


def split_head(data: bytes, parse: Callable[[bytes], Any]) -> tuple[str, str, bytes]:
    """(model_name, model_version, the message without them), parsing in full only when it must.

    `parse` turns bytes into the message type (ModelInferRequest.FromString or the response's).
    """
    head = read_head(data)
    if head is not None:
        name, version, offset = head
        return name, version, data[offset:]
    message = parse(data)
    name, version = message.model_name, message.model_version
    message.ClearField("model_name")
    message.ClearField("model_version")
    return name, version, message.SerializeToString()


def replace_head(data: bytes, head: bytes, parse: Callable[[bytes], Any]) -> bytes:
    """The message with its model_name/model_version replaced by the pre-encoded `head`."""
    _, _, rest = split_head(data, parse)
    return head + rest

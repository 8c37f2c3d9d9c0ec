"""The Lua filters of the data plane (package data kserve.lua, kserve_upstream.lua) as Envoy filter dicts."""

from __future__ import annotations

import base64
import re
from functools import cache
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

LUA_FILTER = "envoy.filters.http.lua"
LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
UPSTREAM_CODEC_FILTER = "envoy.filters.http.upstream_codec"
UPSTREAM_CODEC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
FIELD_EXTRACTION_FILTER = "envoy.filters.http.grpc_field_extraction"
FIELD_EXTRACTION_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.http.grpc_field_extraction.v3.GrpcFieldExtractionConfig"
)
STREAM_METHOD = "inference.GRPCInferenceService.ModelStreamInfer"

# Triton accepts a shape whose element count overflows int64, so the edge bounds it (issue 13).
DEFAULT_MAX_ELEMENTS = 2**31

_MAX_ELEMENTS_LINE = "local MAX_ELEMENTS = 2147483648\n"
_TRUST_HEADER_LINE = "local TRUST_HEADER = false\n"
_NAMES_LINE = 'local TRITON_NAME, TRITON_VERSION, CLIENT_NAME, CLIENT_VERSION = "triton", "", "client", ""\n'
_LUA_PLAIN = re.compile(r"[A-Za-z0-9_.\-:/ ]")


@cache
def _package_source(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _filter_source(name: str) -> str:
    """A filter's Lua with the shared protobuf writer (varint, field_bytes) in front of it."""
    return _package_source("protobuf_write.lua") + _package_source(name)


def _replace_line(source: str, line: str, replacement: str) -> str:
    if source.count(line) != 1:
        raise RuntimeError(f"the Lua source lost its configuration line {line.strip()!r}")
    return source.replace(line, replacement)


def lua_string(value: str) -> str:
    """A Lua string literal for any text: bytes outside a small safe set become decimal escapes."""
    return '"' + "".join(chr(b) if _LUA_PLAIN.fullmatch(chr(b)) else f"\\{b}" for b in value.encode()) + '"'


def downstream_source(max_elements: int = DEFAULT_MAX_ELEMENTS, *, trust_header: bool = False) -> str:
    """kserve.lua with this deployment's input-size limit; `trust_header` skips the body check when the
    client names its model in x-servegrid-model (for the internal mesh listener only)."""
    if not 0 < max_elements <= 2**53:
        raise ValueError("max_elements must be in 1..2^53 (Lua numbers are doubles)")
    source = _replace_line(_filter_source("kserve.lua"), _MAX_ELEMENTS_LINE, f"local MAX_ELEMENTS = {max_elements}\n")
    trust = "true" if trust_header else "false"
    return _replace_line(source, _TRUST_HEADER_LINE, f"local TRUST_HEADER = {trust}\n")


def upstream_source(triton_name: str, triton_version: str, client_name: str, client_version: str = "") -> str:
    """kserve_upstream.lua with one cluster's names inlined."""
    names = ", ".join(lua_string(v) for v in (triton_name, triton_version, client_name, client_version))
    line = f"local TRITON_NAME, TRITON_VERSION, CLIENT_NAME, CLIENT_VERSION = {names}\n"
    return _replace_line(_filter_source("kserve_upstream.lua"), _NAMES_LINE, line)


def _lua_filter(source: str, stat_prefix: str) -> dict[str, Any]:
    return {
        "name": LUA_FILTER,
        "typed_config": {
            "@type": LUA_TYPE,
            "default_source_code": {"inline_string": source},
            "stat_prefix": stat_prefix,
        },
    }


def downstream_filter(max_elements: int = DEFAULT_MAX_ELEMENTS, *, trust_header: bool = False) -> dict[str, Any]:
    """The kserve Lua filter for the public and mesh listeners: right after stream_extraction_filter(),
    before jwt_authn, ext_authz and RBAC (clearing the route cache after them could bypass them)."""
    return _lua_filter(downstream_source(max_elements, trust_header=trust_header), "kserve")


def upstream_rename_filters(
    triton_name: str, triton_version: str, client_name: str, client_version: str = ""
) -> list[dict[str, Any]]:
    """HttpProtocolOptions.http_filters for a cluster whose Triton name/version differ from the
    client's: the rename Lua, then the upstream codec. `client_version` (the registry's version
    string) goes into ModelInfer responses when given."""
    return [
        _lua_filter(upstream_source(triton_name, triton_version, client_name, client_version), "kserve_rename"),
        {"name": UPSTREAM_CODEC_FILTER, "typed_config": {"@type": UPSTREAM_CODEC_TYPE}},
    ]


def needs_rename(triton_name: str, triton_version: str, client_name: str, client_version: str) -> bool:
    """Whether a cluster needs the rename filter (clusters whose names agree get none: no body copy)."""
    return triton_name != client_name or (triton_version not in ("", client_version))


def _file_descriptor_set(root: FileDescriptor) -> bytes:
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(descriptor: FileDescriptor) -> None:
        if descriptor.name in files:
            return
        for dependency in descriptor.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        files[descriptor.name] = proto

    add(root)
    return descriptor_pb2.FileDescriptorSet(file=list(files.values())).SerializeToString()


def stream_extraction_filter() -> dict[str, Any]:
    """grpc_field_extraction for ModelStreamInfer: holds a stream's headers until its first message is
    complete and puts that message's model_name/model_version into dynamic metadata, where the kserve
    Lua filter (placed right after it) reads them. Other methods pass it untouched."""
    from tritonclient.grpc import service_pb2  # the KServe v2 descriptors ship with tritonclient

    descriptor_set = _file_descriptor_set(service_pb2.DESCRIPTOR)
    return {
        "name": FIELD_EXTRACTION_FILTER,
        "typed_config": {
            "@type": FIELD_EXTRACTION_TYPE,
            "descriptor_set": {"inline_bytes": base64.b64encode(descriptor_set).decode()},
            "extractions_by_method": {
                STREAM_METHOD: {
                    "request_field_extractions": {"model_name": {}, "model_version": {}},
                }
            },
        },
    }

"""services.mesh.lua renders filter dicts that Envoy's own protobuf types accept, with names escaped."""

from __future__ import annotations

import pytest
from envoy.extensions.filters.http.grpc_field_extraction.v3 import config_pb2 as extraction_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import descriptor_pb2, json_format

from services.mesh import lua, names


def _parse_lua(filter_dict: dict[str, object]) -> lua_pb2.Lua:
    config = dict(filter_dict["typed_config"])  # type: ignore[call-overload]
    assert config.pop("@type") == lua.LUA_TYPE
    return json_format.ParseDict(config, lua_pb2.Lua())


def test_downstream_filter_carries_its_limits() -> None:
    source = _parse_lua(lua.downstream_filter(max_elements=1000)).default_source_code.inline_string
    assert "local MAX_ELEMENTS = 1000\n" in source
    assert "local TRUST_HEADER = false\n" in source
    assert "local TRUST_HEADER = true\n" in lua.downstream_source(trust_header=True)
    with pytest.raises(ValueError):
        lua.downstream_source(2**60)


def test_the_filter_caps_names_where_every_service_does() -> None:
    assert f"local MAX_NAME = {names.MAX_NAME_BYTES}\n" in lua.downstream_source()


def test_upstream_rename_filters_fit_http_protocol_options() -> None:
    assert upstream_codec_pb2.UpstreamCodec.DESCRIPTOR  # in the pool, so the Any parses
    filters = lua.upstream_rename_filters("affine_batched", "1", "affine", "3")
    options = json_format.ParseDict(
        {"explicit_http_config": {"http2_protocol_options": {}}, "http_filters": filters},
        http_protocol_options_pb2.HttpProtocolOptions(),
    )
    assert [f.name for f in options.http_filters] == [lua.LUA_FILTER, lua.UPSTREAM_CODEC_FILTER]
    source = _parse_lua(filters[0]).default_source_code.inline_string
    assert 'CLIENT_NAME, CLIENT_VERSION = "affine_batched", "1", "affine", "3"\n' in source


@pytest.mark.parametrize("name", ['a"b', "a\\b", "a\nb", "mödel", "]]--"])
def test_names_become_safe_lua_literals(name: str) -> None:
    literal = lua.lua_string(name)
    body = literal[1:-1]
    assert literal[0] == literal[-1] == '"'
    assert all(c.isalnum() or c in "_.-:/ \\" for c in body)
    decoded = bytearray()
    i = 0
    while i < len(body):  # decimal escapes, as Lua reads them
        if body[i] == "\\":
            j = i + 1
            while j < len(body) and j < i + 4 and body[j].isdigit():
                j += 1
            decoded.append(int(body[i + 1 : j]))
            i = j
        else:
            decoded.append(ord(body[i]))
            i += 1
    assert decoded.decode() == name


def test_needs_rename_only_where_names_differ() -> None:
    assert not lua.needs_rename("affine", "", "affine", "3")
    assert lua.needs_rename("affine_batched", "", "affine", "3")
    assert lua.needs_rename("affine", "2", "affine", "3")


def test_stream_extraction_filter_describes_the_kserve_service() -> None:
    config = dict(lua.stream_extraction_filter()["typed_config"])
    assert config.pop("@type") == lua.FIELD_EXTRACTION_TYPE
    parsed = json_format.ParseDict(config, extraction_pb2.GrpcFieldExtractionConfig())
    files = descriptor_pb2.FileDescriptorSet.FromString(parsed.descriptor_set.inline_bytes)
    assert [f.name for f in files.file] == ["model_config.proto", "grpc_service.proto"]
    assert set(parsed.extractions_by_method) == {lua.STREAM_METHOD}

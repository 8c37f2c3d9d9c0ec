"""OpenAPI 3.1 for the REST API, rendered from the protos' `google.api.http` mappings and their comments."""

# What Envoy's grpc_json_transcoder serves is what this document says (services/mesh/bootstrap.py
# configures it): proto3 JSON (lowerCamelCase names, 64-bit integers as strings, enums by name, bytes as
# base64), path fields from the URL template, for body "*" every other field in the body, for body "x"
# field x in the body and every other field in the query string, for no body every non-path field in the
# query string (unknown query parameters are 400: reject_unknown_query_parameters), errors as
# google.rpc.Status JSON (convert_grpc_status), server streams as newline-delimited JSON.
#
# Why our own generator: the maintained ones are Go protoc plugins (grpc-gateway's protoc-gen-openapiv2
# writes Swagger 2.0, gnostic's protoc-gen-openapi writes 3.0) and neither is installable here; PyPI has
# only the annotation stubs of the former. The input is a FileDescriptorSet with source info (comments),
# which scripts/gen_protos.py builds next to Envoy's descriptor set (that one carries no comments: they
# would only enlarge every Envoy's config).

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2

from services.mesh import names

Schema = dict[str, Any]
FDP = descriptor_pb2.FieldDescriptorProto

TITLE = "servegrid API"
API_VERSION = "v1"
# AuthService exchanges an API key for a token: the key is its only credential.
API_KEY_ONLY_SERVICES = (names.AUTH_SERVICE,)
BEARER, API_KEY = "bearerAuth", "apiKey"
STATUS = "google.rpc.Status"
# How deep query parameters follow nested messages (`a.b.c`); a recursive message would never end.
MAX_QUERY_DEPTH = 3
VERBS = ("get", "put", "post", "delete", "patch")

# Descriptor-set paths of the elements comments attach to (descriptor.proto's field numbers).
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
SERVICE_METHOD, ENUM_VALUE = 2, 2

_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
SCALARS: dict[int, Schema] = {
    FDP.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FDP.TYPE_FLOAT: {"type": "number", "format": "float"},
    FDP.TYPE_INT64: _INT64,
    FDP.TYPE_SFIXED64: _INT64,
    FDP.TYPE_SINT64: _INT64,
    FDP.TYPE_UINT64: _UINT64,
    FDP.TYPE_FIXED64: _UINT64,
    FDP.TYPE_INT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FDP.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FDP.TYPE_BOOL: {"type": "boolean"},
    FDP.TYPE_STRING: {"type": "string"},
    FDP.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
# Well-known types have their own JSON forms (the proto3 JSON mapping), not their messages' shape.
WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated field paths."},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "description": "A message of the type `@type` names, its fields beside `@type`.",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": SCALARS[FDP.TYPE_DOUBLE],
    "google.protobuf.FloatValue": SCALARS[FDP.TYPE_FLOAT],
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": SCALARS[FDP.TYPE_INT32],
    "google.protobuf.UInt32Value": SCALARS[FDP.TYPE_UINT32],
    "google.protobuf.BoolValue": SCALARS[FDP.TYPE_BOOL],
    "google.protobuf.StringValue": SCALARS[FDP.TYPE_STRING],
    "google.protobuf.BytesValue": SCALARS[FDP.TYPE_BYTES],
}
# Well-known types that travel as one query-string value.
QUERY_SCALAR_TYPES = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"} | {
    name for name in WELL_KNOWN if name.endswith("Value") and name not in ("google.protobuf.Value",)
}


def clean_comment(text: str) -> str:
    """A proto comment as prose: the leading space of each line dropped, paragraphs kept."""
    lines = [line[1:] if line.startswith(" ") else line for line in text.strip("\n").splitlines()]
    return "\n".join(lines).strip()


@dataclass(frozen=True)
class Message:
    """A message with the comments of its own fields (keyed by field name)."""

    proto: descriptor_pb2.DescriptorProto
    comment: str
    field_comments: dict[str, str]


@dataclass(frozen=True)
class Enum:
    proto: descriptor_pb2.EnumDescriptorProto
    comment: str
    value_comments: dict[str, str]


@dataclass(frozen=True)
class Method:
    service: str  # full name
    proto: descriptor_pb2.MethodDescriptorProto
    comment: str


@dataclass(frozen=True)
class Service:
    name: str  # full name
    comment: str
    methods: tuple[Method, ...]


class Catalogue:
    """Every message, enum and service of a descriptor set by full name, with its comments."""

    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, Message] = {}
        self.enums: dict[str, Enum] = {}
        self.services: dict[str, Service] = {}
        for file in descriptor_set.file:
            comments = {tuple(loc.path): clean_comment(loc.leading_comments) for loc in file.source_code_info.location}
            prefix = f"{file.package}." if file.package else ""
            self._add_messages(file.message_type, prefix, (FILE_MESSAGE,), comments)
            self._add_enums(file.enum_type, prefix, (FILE_ENUM,), comments)
            for si, service in enumerate(file.service):
                full = prefix + service.name
                methods = tuple(
                    Method(full, m, comments.get((FILE_SERVICE, si, SERVICE_METHOD, mi), ""))
                    for mi, m in enumerate(service.method)
                )
                self.services[full] = Service(full, comments.get((FILE_SERVICE, si), ""), methods)

    def _add_messages(
        self,
        messages: Iterable[descriptor_pb2.DescriptorProto],
        prefix: str,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        for mi, message in enumerate(messages):
            here = (*path, mi)
            fields = {f.name: comments.get((*here, MESSAGE_FIELD, fi), "") for fi, f in enumerate(message.field)}
            full = prefix + message.name
            self.messages[full] = Message(message, comments.get(here, ""), fields)
            self._add_messages(message.nested_type, f"{full}.", (*here, MESSAGE_NESTED), comments)
            self._add_enums(message.enum_type, f"{full}.", (*here, MESSAGE_ENUM), comments)

    def _add_enums(
        self,
        enums: Iterable[descriptor_pb2.EnumDescriptorProto],
        prefix: str,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        for ei, enum in enumerate(enums):
            here = (*path, ei)
            values = {v.name: comments.get((*here, ENUM_VALUE, vi), "") for vi, v in enumerate(enum.value)}
            self.enums[prefix + enum.name] = Enum(enum, comments.get(here, ""), values)


def _type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    return field.type_name.removeprefix(".")


def _behaviors(field: descriptor_pb2.FieldDescriptorProto) -> set[int]:
    return set(field.options.Extensions[field_behavior_pb2.field_behavior])


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


class SchemaBuilder:
    """Component schemas for the messages and enums the operations use (only those, collected as used)."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.components: dict[str, Schema] = {}

    def type_schema(self, name: str) -> Schema:
        """A reference to message or enum `name` (its component added), or a well-known type's JSON form."""
        if name in WELL_KNOWN:
            return dict(WELL_KNOWN[name])
        if name not in self.components:
            self.components[name] = {}  # placeholder first: recursive messages refer to themselves
            self.components[name] = self._enum(name) if name in self.catalogue.enums else self.message_schema(name)
        return _ref(name)

    def _enum(self, name: str) -> Schema:
        enum = self.catalogue.enums[name]
        values = [v.name for v in enum.proto.value]
        lines = [enum.comment, ""] + [f"- `{v}`: {enum.value_comments[v]}" for v in values if enum.value_comments[v]]
        return {"type": "string", "enum": values, "description": "\n".join(lines).strip()}

    def message_schema(self, name: str, exclude: frozenset[str] = frozenset()) -> Schema:
        """The JSON object of message `name`, without the fields in `exclude` (bound elsewhere, e.g. the path)."""
        message = self.catalogue.messages[name]
        properties: dict[str, Schema] = {}
        required: list[str] = []
        oneofs: dict[int, list[str]] = {}
        for field in message.proto.field:
            if field.name in exclude:
                continue
            properties[field.json_name] = self.field_schema(field, message.field_comments[field.name])
            if field_behavior_pb2.REQUIRED in _behaviors(field):
                required.append(field.json_name)
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneofs.setdefault(field.oneof_index, []).append(field.json_name)
        schema: Schema = {"type": "object"}
        description = message.comment + "".join(
            f"\n\nAt most one of {', '.join(f'`{n}`' for n in members)} is set." for members in oneofs.values()
        )
        if description:
            schema["description"] = description
        schema["properties"] = properties
        if required:
            schema["required"] = required
        return schema

    def _map_schema(self, field: descriptor_pb2.FieldDescriptorProto) -> Schema | None:
        entry = self.catalogue.messages.get(_type_name(field)) if field.type == FDP.TYPE_MESSAGE else None
        if entry is None or not entry.proto.options.map_entry:
            return None
        value = next(f for f in entry.proto.field if f.name == "value")
        return {"type": "object", "additionalProperties": self._single(value)}

    def _single(self, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
            return self.type_schema(_type_name(field))
        return dict(SCALARS[field.type])

    def field_schema(self, field: descriptor_pb2.FieldDescriptorProto, comment: str) -> Schema:
        schema = self._map_schema(field)
        if schema is None:
            schema = self._single(field)
            if field.label == FDP.LABEL_REPEATED:
                schema = {"type": "array", "items": schema}
        if comment:
            schema["description"] = comment
        if field_behavior_pb2.OUTPUT_ONLY in _behaviors(field):
            schema["readOnly"] = True
        return schema


# --- operations --------------------------------------------------------------------------------

_TEMPLATE_VAR = re.compile(r"\{([^}=]+)(=[^}]*)?\}")


@dataclass(frozen=True)
class Binding:
    verb: str
    path: str  # OpenAPI path template, one `{parameter}` per bound field (parameter_names)
    body: str  # "", "*" or a top-level field name
    path_fields: tuple[str, ...]  # dotted proto field paths bound in the URL


def parameter_names(fields: Iterable[str]) -> dict[str, str]:
    """Path-parameter names for bound field paths: the last part (`model.model_id` → `model_id`), or every
    part joined by `_` when two would clash. Dots are legal in OpenAPI but break tools that read a template as
    a format string (schemathesis) or a parameter name as an identifier (client generators)."""
    fields = list(fields)
    last = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: (n if last.count(n) == 1 else f.replace(".", "_")) for f, n in zip(fields, last, strict=True)}


def _openapi_template(template: str, parameters: dict[str, str]) -> str:
    return _TEMPLATE_VAR.sub(lambda m: "{" + parameters[m.group(1)] + "}", template)


def bindings(method: descriptor_pb2.MethodDescriptorProto) -> list[Binding]:
    """The method's HTTP rule and its additional bindings, in declaration order."""
    if not method.options.HasExtension(annotations_pb2.http):
        return []
    rule = method.options.Extensions[annotations_pb2.http]
    rules: list[http_pb2.HttpRule] = [rule, *rule.additional_bindings]
    found = []
    for r in rules:
        verb = r.WhichOneof("pattern")
        if verb not in VERBS:
            continue  # `custom` verbs have no OpenAPI method
        template = getattr(r, verb)
        fields = tuple(m.group(1) for m in _TEMPLATE_VAR.finditer(template))
        found.append(Binding(verb, _openapi_template(template, parameter_names(fields)), r.body, fields))
    return found


class OperationBuilder:
    def __init__(self, catalogue: Catalogue, schemas: SchemaBuilder) -> None:
        self.catalogue = catalogue
        self.schemas = schemas

    def _field(self, message: str, dotted: str) -> tuple[descriptor_pb2.FieldDescriptorProto, str]:
        """The field at a dotted path from `message`, with its comment."""
        *parents, last = dotted.split(".")
        for part in parents:
            message = _type_name(next(f for f in self.catalogue.messages[message].proto.field if f.name == part))
        owner = self.catalogue.messages[message]
        field = next(f for f in owner.proto.field if f.name == last)
        return field, owner.field_comments[last]

    def _path_parameter(self, message: str, dotted: str, name: str) -> Schema:
        field, comment = self._field(message, dotted)
        schema = self.schemas.field_schema(field, "")
        schema.pop("readOnly", None)
        if schema.get("type") == "string" and "pattern" not in schema:
            schema["pattern"] = "^[^/]+$"  # a single path segment (the template's `*`)
        parameter: Schema = {"name": name, "in": "path", "required": True, "schema": schema}
        if name != dotted:
            comment = f"{comment}\n\n(Field `{dotted}` of the request.)".strip()
        if comment:
            parameter["description"] = comment
        return parameter

    def _query_parameters(
        self, message: str, skip: set[str], prefix: str = "", json_prefix: str = "", depth: int = 0
    ) -> Iterator[Schema]:
        """Every leaf field not bound elsewhere, by its JSON name (dotted for nested messages' fields)."""
        owner = self.catalogue.messages[message]
        for field in owner.proto.field:
            proto_path, json_path = f"{prefix}{field.name}", f"{json_prefix}{field.json_name}"
            if proto_path in skip or field_behavior_pb2.OUTPUT_ONLY in _behaviors(field):
                continue
            if field.type == FDP.TYPE_MESSAGE and _type_name(field) not in QUERY_SCALAR_TYPES:
                entry = self.catalogue.messages.get(_type_name(field))
                if entry is None or entry.proto.options.map_entry or field.label == FDP.LABEL_REPEATED:
                    continue  # maps, repeated messages and opaque JSON types have no query-string form
                if depth < MAX_QUERY_DEPTH:
                    yield from self._query_parameters(
                        _type_name(field), skip, f"{proto_path}.", f"{json_path}.", depth + 1
                    )
                continue
            yield self._query_parameter(field, json_path, owner.field_comments[field.name], top_level=depth == 0)

    def _query_parameter(
        self, field: descriptor_pb2.FieldDescriptorProto, name: str, comment: str, *, top_level: bool
    ) -> Schema:
        schema = self.schemas.field_schema(field, "")
        schema.pop("readOnly", None)
        parameter: Schema = {"name": name, "in": "query", "schema": schema}
        if field_behavior_pb2.REQUIRED in _behaviors(field) and top_level:
            parameter["required"] = True
        if comment:
            parameter["description"] = comment
        if schema.get("type") == "array":
            parameter["style"], parameter["explode"] = "form", True
        return parameter

    def _request_body(self, request: str, binding: Binding) -> Schema | None:
        if not binding.body:
            return None
        if binding.body == "*":
            # The path's top-level fields leave the body (a nested one would stay inside its message).
            in_path = frozenset(p for p in binding.path_fields if "." not in p)
            schema = self.schemas.message_schema(request, exclude=in_path)
            description = schema.pop("description", "")
        else:
            field, description = self._field(request, binding.body)
            schema = self.schemas.field_schema(field, "")
        body: Schema = {"required": True, "content": {"application/json": {"schema": schema}}}
        if description:
            body["description"] = description
        return body

    def _responses(self, method: descriptor_pb2.MethodDescriptorProto) -> Schema:
        response = self.schemas.type_schema(_full_name(method.output_type))
        ok: Schema = {"description": "OK", "content": {"application/json": {"schema": response}}}
        if method.server_streaming:
            # Envoy labels the stream application/json; its body is one message per line.
            ok["description"] = "A stream: newline-delimited JSON, each line one message of this schema."
        error = {
            "description": "An error: the gRPC status as JSON (its `details` carry a google.rpc.ErrorInfo).",
            "content": {"application/json": {"schema": self.schemas.type_schema(STATUS)}},
        }
        return {"200": ok, "default": error}

    def operation(self, service: Service, method: Method, binding: Binding, index: int) -> Schema:
        request = _full_name(method.proto.input_type)
        short = service.name.rsplit(".", 1)[-1]
        summary, _, _ = method.comment.partition("\n\n")
        operation: Schema = {
            "operationId": f"{short}_{method.proto.name}" + (f"_{index + 1}" if index else ""),
            "tags": [short],
        }
        if method.comment:
            operation["summary"] = summary.split(". ")[0].rstrip(".").replace("\n", " ")
            operation["description"] = method.comment
        path_names = parameter_names(binding.path_fields)
        parameters = [self._path_parameter(request, field, path_names[field]) for field in binding.path_fields]
        if binding.body != "*":
            skip = set(binding.path_fields) | ({binding.body} if binding.body else set())
            parameters += self._query_parameters(request, skip)
        if parameters:
            operation["parameters"] = parameters
        body = self._request_body(request, binding)
        if body is not None:
            operation["requestBody"] = body
        operation["responses"] = self._responses(method.proto)
        if service.name in API_KEY_ONLY_SERVICES:
            operation["security"] = [{API_KEY: []}]
        return operation


def _full_name(type_name: str) -> str:
    return type_name.removeprefix(".")


def _info(catalogue: Catalogue) -> Schema:
    return {
        "title": TITLE,
        "version": API_VERSION,
        "description": (
            "servegrid's REST API: Envoy transcodes each call to the gRPC method it is generated from "
            "(proto3 JSON: lowerCamelCase names, 64-bit integers as strings, enums by name, bytes as base64).\n\n"
            "Authenticate with `Authorization: Bearer <JWT>` (the identity provider's token, or one exchanged "
            "for an API key at `POST /v1/auth:token`) or with `x-api-key: <key>`. The `/v1/admin/` and "
            "`/v1/router/` operations need the admin role. Errors are the gRPC status as JSON: `code`, `message` "
            'and `details`, one of them a `google.rpc.ErrorInfo` with domain "servegrid.dev" and a `reason` such as '
            "MODEL_NOT_FOUND.\n\n"
            "Generated from proto/ by scripts/gen_protos.py; do not edit by hand."
        ),
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    }


def render(
    descriptor_set: descriptor_pb2.FileDescriptorSet, services: Iterable[str] = names.TRANSCODED_SERVICES
) -> Schema:
    """The OpenAPI document of `services` (full names: by default those Envoy transcodes) as a dict, in a
    fixed order."""
    catalogue = Catalogue(descriptor_set)
    schemas = SchemaBuilder(catalogue)
    operations = OperationBuilder(catalogue, schemas)
    paths: dict[str, dict[str, Schema]] = {}
    tags = []
    for name in services:
        service = catalogue.services[name]
        tags.append({"name": name.rsplit(".", 1)[-1], "description": service.comment})
        for method in service.methods:
            for index, binding in enumerate(bindings(method.proto)):
                paths.setdefault(binding.path, {})[binding.verb] = operations.operation(service, method, binding, index)
    return {
        "openapi": "3.1.0",
        "info": _info(catalogue),
        "tags": tags,
        "security": [{BEARER: []}, {API_KEY: []}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A JWT from the identity provider, or one exchanged for an API key.",
                },
                API_KEY: {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "An API key."},
            },
        },
    }


def to_json(document: Schema) -> str:
    """The committed form: two-space indentation, keys in document order, a final newline."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"

-- servegrid: upstream rename for one cluster whose Triton model name/version differ from the client's.
--
-- Runs in the cluster's HttpProtocolOptions.http_filters (then upstream_codec), so it sees the
-- request after routing chose this cluster. gRPC: the new model_name/model_version are *appended*
-- to the end of the request's one message (protobuf keeps the last occurrence of a singular field,
-- and the downstream filter already refused messages that repeat them), and the gRPC length prefix
-- is fixed. The response gets the client's name appended the same way (for ModelConfig an appended
-- `config {name}` merges into the config). Only the chunks holding the prefix and the message's end
-- are copied into Lua; a body the downstream peek buffered arrives as one chunk, so a large tensor
-- is copied once per direction: a registry that deploys versions under the names clients use
-- avoids this filter entirely. REST: `:path` is rewritten and JSON answers name the client's model.

-- lua.py replaces this line with the cluster's names (Lua string literals).
local TRITON_NAME, TRITON_VERSION, CLIENT_NAME, CLIENT_VERSION = "triton", "", "client", ""

local GRPC_PREFIX = "/inference.GRPCInferenceService/"
local REST_PREFIX = "/v2/models/"
local FAILED_PRECONDITION = 9

local byte, char, sub, floor = string.byte, string.char, string.sub, math.floor

-- varint and field_bytes: protobuf_write.lua (lua.py puts it in front of this file).

local function head(name, version)
  local out = field_bytes(1, name)
  if version ~= "" then
    out = out .. field_bytes(2, version)
  end
  return out
end

-- What each RPC appends to its request and to its response (nil: leave that direction alone).
-- The request always gets field 2, empty when the cluster serves Triton's latest version: the last
-- occurrence wins, so a client's own model_version (the registry's, e.g. "2") never reaches Triton,
-- which reads an empty model_version as "the version its policy serves".
local REQUEST_TAIL = field_bytes(1, TRITON_NAME) .. field_bytes(2, TRITON_VERSION)
local RENAMES = {
  ModelInfer = { request = REQUEST_TAIL, response = head(CLIENT_NAME, CLIENT_VERSION) },
  ModelMetadata = { request = REQUEST_TAIL, response = field_bytes(1, CLIENT_NAME) },
  ModelReady = { request = REQUEST_TAIL },
  ModelConfig = { request = REQUEST_TAIL, response = field_bytes(1, field_bytes(1, CLIENT_NAME)) },
  ModelStatistics = { request = REQUEST_TAIL },
}

local function be32(n)
  return char(floor(n / 16777216) % 256, floor(n / 65536) % 256, floor(n / 256) % 256, n % 256)
end

-- Appends `tail` to the one gRPC message flowing through `handle`'s body chunks, fixing its
-- length prefix. Only the chunk holding the prefix and the one where the message ends are copied,
-- each once into Lua and once back (the fewest copies setBytes, which replaces a whole chunk, allows).
local function append_to_message(handle, tail)
  local seen, stop = 0, nil
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if stop == nil then
      if n < 5 then
        return -- a prefix split across chunks is left alone: Triton answers for its own name
      end
      local b0, b1, b2, b3, b4 = byte(chunk:getBytes(0, 5), 1, 5)
      local length = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
      local prefix = char(b0) .. be32(length + #tail)
      stop = 5 + length
      if n >= stop then
        local after = n > stop and chunk:getBytes(stop, n - stop) or ""
        chunk:setBytes(prefix .. chunk:getBytes(5, length) .. tail .. after)
        return
      end
      chunk:setBytes(prefix .. chunk:getBytes(5, n - 5))
    elseif seen + n >= stop then
      local at = stop - seen
      local after = n > at and chunk:getBytes(at, n - at) or ""
      chunk:setBytes(chunk:getBytes(0, at) .. tail .. after)
      return
    end
    seen = seen + n
  end
end

local function rest_path(path)
  -- /v2/models/{client}[/versions/{v}][/rest]  ->  /v2/models/{triton}[/versions/{tv}][/rest]: the
  -- client's version segment always goes (it is the registry's), Triton's is added only when it has one.
  local rest = sub(path, #REST_PREFIX + 1)
  local slash = rest:find("/", 1, true)
  local model, tail = rest, ""
  if slash ~= nil then
    model, tail = sub(rest, 1, slash - 1), sub(rest, slash)
  end
  if model ~= CLIENT_NAME then
    return nil
  end
  local after_version = tail:match("^/versions/[^/?]*(.*)$")
  if after_version ~= nil then
    tail = after_version
  end
  local version = TRITON_VERSION ~= "" and ("/versions/" .. TRITON_VERSION) or ""
  return REST_PREFIX .. TRITON_NAME .. version .. tail
end

local function replace_first(text, old, new)
  local at = text:find(old, 1, true)
  if at == nil then
    return text, 0
  end
  return sub(text, 1, at - 1) .. new .. sub(text, at + #old), #new - #old
end

local function rewrite_json(handle)
  local headers = handle:headers()
  local json_length = tonumber(headers:get("inference-header-content-length") or "")
  local content_type = headers:get("content-type") or ""
  if json_length == nil and content_type:find("json", 1, true) == nil then
    return
  end
  local body = handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  local data = body:getBytes(0, body:length())
  local json = json_length ~= nil and sub(data, 1, json_length) or data
  local grown, delta = 0, 0
  json, delta = replace_first(json, '"model_name":"' .. TRITON_NAME .. '"', '"model_name":"' .. CLIENT_NAME .. '"')
  grown = grown + delta
  json, delta = replace_first(json, '{"name":"' .. TRITON_NAME .. '"', '{"name":"' .. CLIENT_NAME .. '"')
  grown = grown + delta
  if CLIENT_VERSION ~= "" and TRITON_VERSION ~= "" then
    json, delta =
      replace_first(json, '"model_version":"' .. TRITON_VERSION .. '"', '"model_version":"' .. CLIENT_VERSION .. '"')
    grown = grown + delta
  end
  if grown == 0 and json == data then
    return
  end
  if json_length ~= nil then
    body:setBytes(json .. sub(data, json_length + 1))
    handle:headers():replace("inference-header-content-length", tostring(json_length + grown))
  else
    body:setBytes(json)
  end
end

local function refuse_stream(handle)
  handle:respond({
    [":status"] = "200",
    ["content-type"] = "application/grpc",
    ["grpc-status"] = tostring(FAILED_PRECONDITION),
    ["grpc-message"] = "ModelStreamInfer%20cannot%20reach%20a%20model%20deployed%20under%20another%20Triton%20name",
  })
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local path = headers:get(":path") or ""
  if sub(path, 1, #GRPC_PREFIX) == GRPC_PREFIX then
    local method = sub(path, #GRPC_PREFIX + 1)
    if method == "ModelStreamInfer" then
      refuse_stream(handle)
      return
    end
    local rename = RENAMES[method]
    if rename == nil then
      return
    end
    headers:remove("content-length") -- the message grows; HTTP/2 needs no length
    handle:streamInfo():dynamicMetadata():set("servegrid.rename", "method", method)
    append_to_message(handle, rename.request)
  elseif sub(path, 1, #REST_PREFIX) == REST_PREFIX then
    local renamed = rest_path(path)
    if renamed ~= nil then
      headers:replace(":path", renamed)
      handle:streamInfo():dynamicMetadata():set("servegrid.rename", "rest", true)
    end
  end
end

function envoy_on_response(handle)
  local marks = handle:streamInfo():dynamicMetadata():get("servegrid.rename")
  if marks == nil then
    return
  end
  if marks["rest"] then
    rewrite_json(handle)
    return
  end
  local rename = RENAMES[marks["method"] or ""]
  if rename == nil or rename.response == nil then
    return
  end
  local headers = handle:headers()
  if headers:get("grpc-status") ~= nil then
    return -- trailers-only reply: no message to rename
  end
  headers:remove("content-length")
  append_to_message(handle, rename.response)
end

-- servegrid: route KServe v2 gRPC by model name (downstream Lua filter, before jwt_authn).
--
-- Every KServe v2 call shares one service path, so the model a request is for lives in its body:
-- field 1 (model_name) and field 2 (model_version) of ModelInfer/ModelMetadata/ModelReady/
-- ModelConfig/ModelStatistics requests. This filter puts them into the x-servegrid-model(-version)
-- headers that the routes match on, and clears the route cache so the router sees them.
-- A client that sends the headers (the SDKs do) is trusted only as far as its body agrees.
--
-- Unary calls: body() buffers the request (its end comes with the request); the walk visits every
-- top-level field, because protobuf keeps the *last* occurrence of a singular field and Triton
-- runs that one, so a message naming two models is refused rather than routed on the first.
-- Length-delimited fields (raw_input_contents) are skipped by offset: only small windows of the
-- body are ever copied into Lua strings.
--
-- ModelStreamInfer never ends, so body() would wait forever. A stream routes on its header, or on
-- the first message's model_name that the grpc_field_extraction filter placed before this one has
-- put into dynamic metadata (that filter holds the headers until the first message is complete).

-- lua.py replaces these lines: the deployment's limit (maximum elements per input tensor), and
-- whether a client's x-servegrid-model header is trusted without reading the body (the mesh
-- listener, reachable by the gateway and batch workers only; never the public one, where a header
-- that the body contradicts would route past per-model policy).
local MAX_ELEMENTS = 2147483648
local TRUST_HEADER = false

local MODEL_HEADER = "x-servegrid-model"
local VERSION_HEADER = "x-servegrid-model-version"
local RETRY_OPT_IN = "x-servegrid-retry"
-- The default route policy retries unavailable/connect failures only; a caller that says its
-- request is safe to repeat also gets these (deadline-exceeded matters for per-try timeouts only:
-- Envoy never retries past the caller's own deadline).
local RETRY_GRPC_ON = "cancelled,deadline-exceeded,internal,resource-exhausted,unavailable"
local SERVICE_PREFIX = "/inference.GRPCInferenceService/"
local EXTRACTION_NAMESPACE = "envoy.filters.http.grpc_field_extraction"
local ERROR_DOMAIN = "servegrid.dev"
local INVALID_ARGUMENT = 3
local WINDOW = 4096
-- Longest model name, version or input name accepted (bytes). Registry ids are at most 63; a name
-- echoed in an error must also fit a client's 8 KiB metadata limit with room to spare.
local MAX_NAME = 256
local TWO_32 = 4294967296
local TWO_53 = 9007199254740992
local TWO_63 = 9223372036854775808

local MODEL_SCOPED = {
  ModelInfer = true,
  ModelMetadata = true,
  ModelReady = true,
  ModelConfig = true,
  ModelStatistics = true,
}

local byte, char, sub, format = string.byte, string.char, string.sub, string.format
local floor = math.floor

-- A refusal carries a reason for callers' code (ErrorInfo.reason) and a sentence for people.
local Refusal = {}
Refusal.__index = Refusal

local function refuse(reason, message)
  error(setmetatable({ reason = reason, message = message }, Refusal), 0)
end

---------------------------------------------------------------------------------------------
-- Replies
---------------------------------------------------------------------------------------------

local function percent_encode(text)
  -- gRPC's grpc-message: printable ASCII except '%' stays, everything else is %XX.
  return (text:gsub("[^ -$&-~]", function(c)
    return format("%%%02X", byte(c))
  end))
end

-- varint and field_bytes: protobuf_write.lua (lua.py puts it in front of this file).

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = byte(data, i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local quad = {
      sub(B64, floor(n / 262144) + 1, floor(n / 262144) + 1),
      sub(B64, floor(n / 4096) % 64 + 1, floor(n / 4096) % 64 + 1),
      b and sub(B64, floor(n / 64) % 64 + 1, floor(n / 64) % 64 + 1) or "=",
      c and sub(B64, n % 64 + 1, n % 64 + 1) or "=",
    }
    out[#out + 1] = table.concat(quad)
  end
  return table.concat(out)
end

-- google.rpc.Status{code, message, details: [Any(google.rpc.ErrorInfo{reason, domain})]}
local function status_details(code, message, reason)
  local info = field_bytes(1, reason) .. field_bytes(2, ERROR_DOMAIN)
  local any = field_bytes(1, "type.googleapis.com/google.rpc.ErrorInfo") .. field_bytes(2, info)
  return base64(varint(8) .. varint(code) .. field_bytes(2, message) .. field_bytes(3, any))
end

local function respond_invalid(handle, reason, message)
  -- Trailers-only gRPC reply: no body, so the headers end the stream and carry the status.
  handle:respond({
    [":status"] = "200",
    ["content-type"] = "application/grpc",
    ["grpc-status"] = tostring(INVALID_ARGUMENT),
    ["grpc-message"] = percent_encode(message),
    ["grpc-status-details-bin"] = status_details(INVALID_ARGUMENT, message, reason),
  })
end

---------------------------------------------------------------------------------------------
-- Reading protobuf from an Envoy buffer through small windows
---------------------------------------------------------------------------------------------

-- Positions are 0-based offsets into the buffer; `stop` is exclusive.
local Reader = {}
Reader.__index = Reader

local function new_reader(buffer, total)
  return setmetatable({ buffer = buffer, total = total, base = 0, window = "" }, Reader)
end

-- The byte at `pos` (a number), copying a fresh window from the buffer when `pos` leaves the last.
function Reader:byte_at(pos)
  local offset = pos - self.base
  if offset < 0 or offset >= #self.window then
    local length = self.total - pos
    if length <= 0 then
      return nil
    end
    if length > WINDOW then
      length = WINDOW
    end
    self.window = self.buffer:getBytes(pos, length)
    self.base = pos
    offset = 0
  end
  return byte(self.window, offset + 1)
end

-- A varint at pos (before stop): its value as a double (exact below 2^53) and the next position.
function Reader:varint(pos, stop)
  local value, scale = 0, 1
  for i = 0, 9 do
    if pos + i >= stop then
      refuse("MALFORMED_REQUEST", "the request message is truncated (a varint runs past its end)")
    end
    local b = self:byte_at(pos + i)
    if b < 128 then
      return value + b * scale, pos + i + 1
    end
    value = value + (b - 128) * scale
    scale = scale * 128
  end
  refuse("MALFORMED_REQUEST", "the request message is not valid protobuf (a varint is longer than 10 bytes)")
end

function Reader:bytes(pos, length)
  local offset = pos - self.base
  if offset >= 0 and offset + length <= #self.window then
    return sub(self.window, offset + 1, offset + length)
  end
  return self.buffer:getBytes(pos, length)
end

-- Calls visit(number, wire_type, value_or_start, stop_of_value) for each field in [pos, stop):
-- varints pass their value; length-delimited fields their [start, end) range. Refuses anything
-- that is not well-formed protobuf.
function Reader:walk(pos, stop, visit)
  while pos < stop do
    local key
    key, pos = self:varint(pos, stop)
    local number, wire = floor(key / 8), key % 8
    if number < 1 or number >= 536870912 then
      refuse("MALFORMED_REQUEST", "the request message is not valid protobuf (bad field number)")
    end
    if wire == 0 then
      local value
      value, pos = self:varint(pos, stop)
      visit(number, wire, value, pos)
    elseif wire == 2 then
      local length
      length, pos = self:varint(pos, stop)
      if pos + length > stop then
        refuse("MALFORMED_REQUEST", "the request message is truncated (a field runs past its end)")
      end
      visit(number, wire, pos, pos + length)
      pos = pos + length
    elseif wire == 1 or wire == 5 then
      local width = wire == 1 and 8 or 4
      if pos + width > stop then
        refuse("MALFORMED_REQUEST", "the request message is truncated (a fixed-width field runs past its end)")
      end
      pos = pos + width
    else
      refuse("MALFORMED_REQUEST", "the request message is not valid protobuf (unsupported wire type)")
    end
  end
end

---------------------------------------------------------------------------------------------
-- ModelInferRequest.InferInputTensor: shape checks (Triton itself accepts overflowing shapes)
---------------------------------------------------------------------------------------------

local function check_dim(state, dim)
  if dim >= TWO_63 then
    refuse("INVALID_SHAPE", format("input %q has a negative dimension", state.name))
  end
  if dim >= TWO_53 then
    state.elements = math.huge
  else
    state.elements = state.elements * dim
  end
end

local function check_input(reader, start, stop)
  local state = { name = "?", elements = 1 }
  reader:walk(start, stop, function(number, wire, value, value_stop)
    if number == 1 and wire == 2 then
      if value_stop - value > MAX_NAME then
        refuse("NAME_TOO_LONG", format("an input name is longer than %d bytes", MAX_NAME))
      end
      state.name = reader:bytes(value, value_stop - value)
    elseif number == 3 and wire == 0 then
      check_dim(state, value)
    elseif number == 3 and wire == 2 then
      local pos = value
      while pos < value_stop do
        local dim
        dim, pos = reader:varint(pos, value_stop)
        check_dim(state, dim)
      end
    end
  end)
  if state.elements > MAX_ELEMENTS then
    refuse(
      "INVALID_SHAPE",
      format("input %q has more elements than the %.0f this deployment accepts", state.name, MAX_ELEMENTS)
    )
  end
end

---------------------------------------------------------------------------------------------
-- The request's head: model_name and model_version
---------------------------------------------------------------------------------------------

local NAME_FIELDS = { [1] = "model_name", [2] = "model_version" }

-- The model name and version a unary request's one gRPC message names (nil where absent).
local function read_model(body, check_shapes)
  local total = body:length()
  if total < 5 then
    refuse("MALFORMED_REQUEST", "the request is not a gRPC message (shorter than the 5-byte prefix)")
  end
  local reader = new_reader(body, total)
  local flag = reader:byte_at(0)
  if flag ~= 0 then
    refuse("MALFORMED_REQUEST", "compressed requests are not supported: send KServe v2 calls uncompressed")
  end
  local b1, b2, b3, b4 = byte(reader:bytes(1, 4), 1, 4)
  local length = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
  if length ~= total - 5 then
    refuse("MALFORMED_REQUEST", "the gRPC length prefix does not match the request body (one message expected)")
  end
  local seen = {}
  reader:walk(5, total, function(number, wire, value, value_stop)
    local field = NAME_FIELDS[number]
    if field ~= nil then
      if wire ~= 2 then
        refuse("MALFORMED_REQUEST", field .. " has the wrong protobuf wire type")
      end
      if seen[number] ~= nil then
        refuse("MODEL_NAME_REPEATED", field .. " appears twice in the request; send it once")
      end
      if value_stop - value > MAX_NAME then
        refuse("NAME_TOO_LONG", format("%s is longer than %d bytes", field, MAX_NAME))
      end
      seen[number] = reader:bytes(value, value_stop - value)
    elseif check_shapes and number == 5 and wire == 2 then
      check_input(reader, value, value_stop)
    end
  end)
  return seen[1], seen[2]
end

---------------------------------------------------------------------------------------------
-- Entry point
---------------------------------------------------------------------------------------------

local function name_header_safe(value)
  -- Header values cannot carry control characters; a model name never needs them.
  return value:find("[%z\1-\31\127]") == nil
end

local function publish(handle, name, version)
  -- The headers object taken before body() is gone once body() returned: take it again.
  local headers = handle:headers()
  local sent_name, sent_version = headers:get(MODEL_HEADER), headers:get(VERSION_HEADER)
  if (sent_name ~= nil and #sent_name > MAX_NAME) or (sent_version ~= nil and #sent_version > MAX_NAME) then
    refuse("NAME_TOO_LONG", format("the %s header is longer than %d bytes", MODEL_HEADER, MAX_NAME))
  end
  if sent_name ~= nil and name ~= nil and sent_name ~= name then
    refuse("MODEL_NAME_MISMATCH", format("the %s header names %q but the request names %q", MODEL_HEADER, sent_name, name))
  end
  if sent_version ~= nil and version ~= nil and version ~= "" and sent_version ~= version then
    refuse(
      "MODEL_VERSION_MISMATCH",
      format("the %s header names %q but the request names %q", VERSION_HEADER, sent_version, version)
    )
  end
  if name ~= nil and name ~= "" and sent_name == nil then
    if not name_header_safe(name) then
      refuse("MALFORMED_REQUEST", "model_name contains control characters")
    end
    headers:replace(MODEL_HEADER, name)
  end
  if version ~= nil and version ~= "" and sent_version == nil then
    if not name_header_safe(version) then
      refuse("MALFORMED_REQUEST", "model_version contains control characters")
    end
    headers:replace(VERSION_HEADER, version)
  end
  handle:clearRouteCache()
end

local function opt_into_retries(handle)
  local headers = handle:headers()
  if headers:get(RETRY_OPT_IN) == "true" then
    -- Envoy strips client-sent x-envoy-* headers on external requests: this is the only way in.
    headers:replace("x-envoy-retry-grpc-on", RETRY_GRPC_ON)
  end
end

-- ModelStreamInfer: the first message's name, as grpc_field_extraction extracted it (or nil).
local function extracted_model(handle)
  local extracted = handle:streamInfo():dynamicMetadata():get(EXTRACTION_NAMESPACE)
  if extracted == nil then
    return nil, nil
  end
  local names, versions = extracted["model_name"], extracted["model_version"]
  if type(names) == "table" and #names > 1 then
    refuse("MODEL_NAME_REPEATED", "model_name appears twice in the first stream message; send it once")
  end
  local name = type(names) == "table" and names[1] or nil
  local version = type(versions) == "table" and versions[1] or nil
  return name, version
end

local function route_stream(handle)
  local name, version = extracted_model(handle)
  if name == nil or name == "" then
    if handle:headers():get(MODEL_HEADER) ~= nil then
      return -- routed on the header (no field extraction before this filter)
    end
    refuse(
      "MODEL_HEADER_REQUIRED",
      "ModelStreamInfer needs the " .. MODEL_HEADER .. " header (or model_name in its first message)"
    )
  end
  publish(handle, name, version) -- a header the first message contradicts is refused there
end

local function route(handle, method)
  if method == "ModelStreamInfer" then
    route_stream(handle)
    return
  end
  if not MODEL_SCOPED[method] then
    return -- server-wide and repository/shared-memory/trace/log RPCs pass untouched
  end
  if TRUST_HEADER and handle:headers():get(MODEL_HEADER) ~= nil then
    return -- routed on the header; the body streams through unbuffered
  end
  local name, version = read_model(handle:body(), method == "ModelInfer")
  publish(handle, name, version)
end

---------------------------------------------------------------------------------------------
-- KServe REST inference: the same shape rules on the JSON request (routes match on the path)
---------------------------------------------------------------------------------------------

local function check_json_dims(list)
  local elements = 1
  for dim in list:gmatch("[^,%s]+") do
    local value = tonumber(dim)
    if value == nil or value < 0 or value ~= floor(value) then
      refuse("INVALID_SHAPE", format("shape [%s] has a dimension that is not a non-negative integer", list))
    end
    elements = elements * value
  end
  if elements > MAX_ELEMENTS then
    refuse("INVALID_SHAPE", format("shape [%s] has more elements than the %.0f this deployment accepts", list, MAX_ELEMENTS))
  end
end

-- With the binary-data extension only the JSON head (Inference-Header-Content-Length bytes) is
-- read; otherwise the whole JSON body. Every "shape" array in it is checked, wherever it appears.
local function check_rest_shapes(handle)
  local head_length = tonumber(handle:headers():get("inference-header-content-length") or "")
  local body = handle:body()
  if body == nil then
    return
  end
  local total = body:length()
  local json = body:getBytes(0, head_length ~= nil and math.min(head_length, total) or total)
  for list in json:gmatch('"shape"%s*:%s*%[([^%]]*)%]') do
    check_json_dims(list)
  end
end

-- `text` as the inside of a JSON string.
local function json_escape(text)
  return (text:gsub('[%c"\\]', function(c)
    return format("\\u%04x", byte(c))
  end))
end

local function respond_invalid_json(handle, message)
  local escaped = json_escape(message)
  handle:respond({ [":status"] = "400", ["content-type"] = "application/json" }, '{"error":"' .. escaped .. '"}')
end

local function is_rest_infer(handle, path)
  return sub(path, 1, 11) == "/v2/models/"
    and handle:headers():get(":method") == "POST"
    and path:gsub("%?.*$", ""):match("/infer$") ~= nil
end

---------------------------------------------------------------------------------------------
-- servegrid REST: header names the services' gRPC metadata can carry
---------------------------------------------------------------------------------------------

-- HTTP allows header names gRPC metadata does not ("#6", "%", "|"): the transcoder would pass them on
-- and the service's gRPC server refuse the whole stream (INTERNAL). Refused here, naming the header.
local function bad_header_name(handle)
  for key, _ in pairs(handle:headers()) do
    if sub(key, 1, 1) ~= ":" and key:find("[^0-9a-z_.%-]") then
      return key
    end
  end
  return nil
end

local function respond_bad_header(handle, key)
  local shown = key:gsub("[^%w%-_.#%%|!$&'*+^`~]", "?")
  local message = format("header name %q cannot be passed to the service (gRPC metadata allows [0-9a-z_.-]); remove it", shown)
  local escaped = json_escape(message)
  local body = format(
    '{"code":%d,"message":"%s","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"INVALID_HEADER_NAME","domain":"%s"}]}\n',
    INVALID_ARGUMENT,
    escaped,
    ERROR_DOMAIN
  )
  handle:respond({ [":status"] = "400", ["content-type"] = "application/json" }, body)
end

function envoy_on_request(handle)
  local path = handle:headers():get(":path")
  if path ~= nil and sub(path, 1, 4) == "/v1/" then
    local key = bad_header_name(handle)
    if key ~= nil then
      respond_bad_header(handle, key)
    end
    return
  end
  if path ~= nil and is_rest_infer(handle, path) then
    local ok, err = pcall(check_rest_shapes, handle)
    if not ok then
      if getmetatable(err) == Refusal then
        respond_invalid_json(handle, err.message)
        return
      end
      error(err, 0)
    end
    return
  end
  if path == nil or sub(path, 1, #SERVICE_PREFIX) ~= SERVICE_PREFIX then
    return -- every other API: routes match on the path
  end
  local method = sub(path, #SERVICE_PREFIX + 1)
  local ok, err = pcall(route, handle, method)
  if not ok then
    if getmetatable(err) == Refusal then
      respond_invalid(handle, err.reason, err.message)
      return
    end
    error(err, 0)
  end
  opt_into_retries(handle)
end

-- servegrid: writing protobuf wire format, shared by the Lua filters (services/mesh/lua.py puts this
-- chunk in front of kserve.lua and kserve_upstream.lua, so both write fields the same way).

local function varint(n)
  local out = {}
  repeat
    local low = n % 128
    n = math.floor(n / 128)
    out[#out + 1] = string.char(n > 0 and low + 128 or low)
  until n == 0
  return table.concat(out)
end

-- A length-delimited field (wire type 2): tag, length, payload.
local function field_bytes(number, payload)
  return varint(number * 8 + 2) .. varint(#payload) .. payload
end


-- Runs one Argo CD health or action script as Argo CD does: the resource in the global `obj`,
-- only the base and table libraries and a safe os (time, date), no string library (not even as
-- string methods), YAML nulls as absent fields. Prints the script's result as JSON.
-- Usage: lua5.1 scripts/argocd-sandbox.lua SCRIPT OBJECT.json
local cjson = require("cjson")
local script, input = arg[1], arg[2]
local f = assert(io.open(input, "rb"))
local text = f:read("*a")
f:close()

local function denull(v)
  if v == cjson.null then
    return nil
  end
  if type(v) == "table" then
    for k, x in pairs(v) do
      v[k] = denull(x)
    end
  end
  return v
end

local chunk = assert(loadfile(script))
local env = {
  obj = denull(cjson.decode(text)),
  actionParams = {},
  table = table,
  os = {time = os.time, date = os.date},
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall,
  rawequal = rawequal, rawget = rawget, rawset = rawset, select = select, setmetatable = setmetatable,
  getmetatable = getmetatable, tonumber = tonumber, tostring = tostring, type = type, unpack = unpack,
  print = print,
}
setfenv(chunk, env)
local strings = getmetatable("")
local methods = strings.__index
strings.__index = nil
local ok, result = pcall(chunk)
strings.__index = methods
if not ok then
  io.stderr:write(tostring(result) .. "\n")
  os.exit(1)
end
io.write(cjson.encode(result))

-- Health of a Bulwark ModelServer for Argo CD: Healthy when a replica serves (or it is scaled to
-- zero on purpose); Progressing while the generation is not observed yet or the model is
-- loading; Degraded when it is invalid or no node offers what it needs (InsufficientGPU).
-- Written for Argo CD's Lua sandbox: no string library.
local hs = {}
local status = obj.status
local generation = obj.metadata.generation

local function condition(name)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == name then
      return c
    end
  end
  return nil
end

local function explain(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Bulwark operator to report status"
  return hs
end
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Bulwark operator to observe generation " .. generation
  return hs
end

for _, name in ipairs({"Accepted", "Scheduled"}) do
  local c = condition(name)
  if c ~= nil and c.status == "False" then
    hs.status = "Degraded"
    hs.message = explain(c)
    return hs
  end
end
local ready = condition("Ready")
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Bulwark operator to report readiness"
elseif ready.status == "True" or ready.reason == "ScaledToZero" then
  hs.status = "Healthy"
  hs.message = ready.message
else
  hs.status = "Progressing"
  hs.message = explain(ready)
end
return hs

-- Health of a Bulwark resource for Argo CD: Healthy when Ready=True for the current generation;
-- Progressing while the generation is not observed yet or sidecars are pending; Degraded when
-- the resource is not accepted, a reference does not resolve, or it is not programmed.
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

local accepted = condition("Accepted")
if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = explain(accepted)
  return hs
end
local refs = condition("ResolvedRefs")
if refs ~= nil and refs.status == "False" then
  hs.status = "Degraded"
  hs.message = explain(refs)
  return hs
end
local ready = condition("Ready")
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Bulwark operator to report readiness"
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
elseif ready.reason == "Pending" then
  hs.status = "Progressing"
  hs.message = explain(ready)
else
  hs.status = "Degraded"
  hs.message = explain(ready)
end
return hs

-- Health of a Bulwark ModelRollout for Argo CD: Progressing while its steps run, Suspended while
-- a step waits for a promote or the rollout is paused, Healthy once it succeeded, Degraded when
-- it was rolled back, aborted or failed, or is invalid. Written for Argo CD's Lua sandbox: no
-- string library.
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

-- An invalid rollout, or one whose route or backends are missing, is never going to run.
for _, name in ipairs({"Accepted", "ResolvedRefs"}) do
  local c = condition(name)
  if c ~= nil and c.status == "False" and (c.observedGeneration == nil or generation == nil or c.observedGeneration >= generation) then
    hs.status = "Degraded"
    hs.message = explain(c)
    return hs
  end
end

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Bulwark operator to start the rollout"
  return hs
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Bulwark operator to start generation " .. generation
  return hs
end

local message = status.message
if message == nil then
  message = ""
end
local phases = {
  Pending = "Progressing",
  Progressing = "Progressing",
  Paused = "Suspended",
  Succeeded = "Healthy",
  RolledBack = "Degraded",
  Aborted = "Degraded",
  Failed = "Degraded",
}
hs.status = phases[status.phase]
if hs.status == nil then
  hs.status = "Unknown"
  message = "Unknown phase " .. status.phase
end
hs.message = message
return hs

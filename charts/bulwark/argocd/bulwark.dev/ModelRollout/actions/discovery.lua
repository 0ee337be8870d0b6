-- The actions Argo CD offers on a ModelRollout, enabled only where they mean something. Each
-- writes a request into status.controls (never spec), which the Bulwark operator acts on.
local actions = {}
local status = obj.status
local phase = nil
local paused = false
if status ~= nil then
  phase = status.phase
  if status.controls ~= nil and status.controls.paused == true then
    paused = true
  end
end
-- While the operator has not started the current generation, the status describes an older one.
local current = status ~= nil and status.observedGeneration ~= nil and status.observedGeneration == obj.metadata.generation
local running = current and (phase == "Progressing" or phase == "Paused")
local stopped = current and (phase == "RolledBack" or phase == "Aborted" or phase == "Failed")
actions["promote"] = {["disabled"] = not running, ["iconClass"] = "fa fa-fw fa-forward", ["displayName"] = "Promote to the next step"}
actions["promote-full"] = {["disabled"] = not running, ["iconClass"] = "fa fa-fw fa-fast-forward", ["displayName"] = "Promote to the last step"}
actions["pause"] = {["disabled"] = not running or paused, ["iconClass"] = "fa fa-fw fa-pause"}
actions["resume"] = {["disabled"] = not running or not paused, ["iconClass"] = "fa fa-fw fa-play"}
actions["abort"] = {["disabled"] = not running, ["iconClass"] = "fa fa-fw fa-times-circle"}
actions["retry"] = {["disabled"] = not stopped, ["iconClass"] = "fa fa-fw fa-redo-alt"}
return actions

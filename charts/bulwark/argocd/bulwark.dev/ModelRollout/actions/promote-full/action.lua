-- Asks the Bulwark operator to go on to the last step at once.
if obj.status == nil then
  obj.status = {}
end
if obj.status.controls == nil then
  obj.status.controls = {}
end
local request = {}
-- The generation the status describes: a request for a newer one waits for the operator.
request.generation = obj.status.observedGeneration or obj.metadata.generation
request.attempt = obj.status.attempt or 1
request.step = obj.status.currentStep or 0
request.full = true
obj.status.controls.promote = request
return obj

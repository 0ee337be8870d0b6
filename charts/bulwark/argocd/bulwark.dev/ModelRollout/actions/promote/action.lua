-- Asks the Bulwark operator to go on to the next step (status.controls.promote names the step it promotes from, so it acts once).
if obj.status == nil then
  obj.status = {}
end
if obj.status.controls == nil then
  obj.status.controls = {}
end
local request = {}
request.generation = obj.metadata.generation
request.attempt = obj.status.attempt or 1
request.step = obj.status.currentStep or 0
obj.status.controls.promote = request
return obj

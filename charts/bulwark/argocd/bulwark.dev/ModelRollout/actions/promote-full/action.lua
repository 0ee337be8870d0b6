-- Asks the Bulwark operator to go on to the last step at once.
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
request.full = true
obj.status.controls.promote = request
return obj

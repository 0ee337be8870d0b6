-- Asks the Bulwark operator to hold the current step; analysis goes on, and a failing canary is still rolled back.
if obj.status == nil then
  obj.status = {}
end
if obj.status.controls == nil then
  obj.status.controls = {}
end
obj.status.controls.paused = true
return obj

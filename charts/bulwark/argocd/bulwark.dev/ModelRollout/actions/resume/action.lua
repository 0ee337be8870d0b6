-- Undoes a pause.
if obj.status == nil then
  obj.status = {}
end
if obj.status.controls == nil then
  obj.status.controls = {}
end
obj.status.controls.paused = false
return obj

-- los on keys never seen before (every request creates a key).
local counter = 0
local prefix = "fresh-" .. tostring(math.random(1, 1e9)) .. "-"
request = function()
  counter = counter + 1
  return req("POST", "/los/" .. prefix .. counter, { ["X-Forwarded-For"] = client_ip(counter % 4096) }, "peer-address:4000")
end

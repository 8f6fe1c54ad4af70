-- GET of keys that do not exist (404).
local pool = {}
for i = 0, 4095 do
  pool[#pool + 1] = req("GET", "/get/missing-" .. i, { ["X-Forwarded-For"] = client_ip(i) })
end
request = pool_request(pool)

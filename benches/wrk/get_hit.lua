-- GET of keys that exist (key-0 .. key-9999, filled by the harness).
local pool = {}
for i = 0, 4095 do
  pool[#pool + 1] = req("GET", "/get/key-" .. (i * 7 % 10000), { ["X-Forwarded-For"] = client_ip(i) })
end
request = pool_request(pool)

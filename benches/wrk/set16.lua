-- set with a 16-byte value, replacing existing keys.
local body = string.rep("v", 16)
local pool = {}
for i = 0, 4095 do
  pool[#pool + 1] = req("POST", "/set/key-" .. (i * 7 % 10000), { ["X-Forwarded-For"] = client_ip(i) }, body)
end
request = pool_request(pool)

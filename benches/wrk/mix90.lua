-- 90% GET, 10% set (100-byte values).
local body = string.rep("v", 100)
local pool = {}
for i = 0, 4095 do
  local headers = { ["X-Forwarded-For"] = client_ip(i) }
  if i % 10 == 0 then
    pool[#pool + 1] = req("POST", "/set/key-" .. (i * 7 % 10000), headers, body)
  else
    pool[#pool + 1] = req("GET", "/get/key-" .. (i * 7 % 10000), headers)
  end
end
request = pool_request(pool)

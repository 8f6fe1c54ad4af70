-- cas contention on one hot key: every connection tries to swap the same
-- key; most attempts lose (409 with the current value).
local pool = {}
for i = 0, 4095 do
  pool[#pool + 1] = req("POST", "/cas/hot", {
    ["X-Forwarded-For"] = client_ip(i),
    ["X-Expected-Value"] = tostring(i % 8),
  }, tostring((i + 1) % 8))
end
request = pool_request(pool)

-- GET hit, 16 requests pipelined per write.
local pool = {}
for i = 0, 255 do
  local batch = ""
  for j = 0, 15 do
    local n = i * 16 + j
    batch = batch .. req("GET", "/get/key-" .. (n * 7 % 10000), { ["X-Forwarded-For"] = client_ip(n) })
  end
  pool[#pool + 1] = batch
end
request = pool_request(pool)

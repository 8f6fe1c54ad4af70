-- set 100 B, 16 requests pipelined per write.
local body = string.rep("v", 100)
local pool = {}
for i = 0, 255 do
  local batch = ""
  for j = 0, 15 do
    local n = i * 16 + j
    batch = batch .. req("POST", "/set/key-" .. (n * 7 % 10000), { ["X-Forwarded-For"] = client_ip(n) }, body)
  end
  pool[#pool + 1] = batch
end
request = pool_request(pool)

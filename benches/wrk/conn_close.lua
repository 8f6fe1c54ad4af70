-- GET hit with Connection: close: a new TCP connection per request.
local pool = {}
for i = 0, 1023 do
  pool[#pool + 1] = req("GET", "/get/key-" .. (i * 7 % 10000), {
    ["X-Forwarded-For"] = client_ip(i),
    ["Connection"] = "close",
  })
end
request = pool_request(pool)

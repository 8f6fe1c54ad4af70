-- One client IP far over its budget: nearly every answer is a 429.
local pool = { req("GET", "/get/key-1", { ["X-Forwarded-For"] = "198.51.100.77" }) }
request = pool_request(pool)

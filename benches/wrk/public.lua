-- Public traffic: one hot keep-alive pool (a front proxy) carrying many
-- distinct clients, each sending a few requests, over a large key space.
-- RDVZ_OP get|set, RDVZ_KEYS keys filled as pub-0 .. pub-(N-1),
-- RDVZ_ADDRS distinct client addresses (100.64.0.0/10: not a trusted
-- proxy range, 256 per /24), RDVZ_VALUE bytes per set.
local op = os.getenv("RDVZ_OP") or "get"
local keys = tonumber(os.getenv("RDVZ_KEYS") or "1000000")
local addrs = tonumber(os.getenv("RDVZ_ADDRS") or "65536")
local body = string.rep("v", tonumber(os.getenv("RDVZ_VALUE") or "100"))
math.randomseed(7)
local pool = {}
for j = 0, addrs - 1 do
  local ip = string.format("100.%d.%d.%d", 64 + math.floor(j / 65536), math.floor(j / 256) % 256, j % 256)
  local key = "pub-" .. math.random(0, keys - 1)
  if op == "get" then
    pool[#pool + 1] = req("GET", "/get/" .. key, { ["X-Forwarded-For"] = ip })
  else
    pool[#pool + 1] = req("POST", "/set/" .. key, { ["X-Forwarded-For"] = ip }, body)
  end
end
-- Consecutive requests come from unrelated clients and networks.
for i = #pool, 2, -1 do
  local j = math.random(i)
  pool[i], pool[j] = pool[j], pool[i]
end
request = pool_request(pool)

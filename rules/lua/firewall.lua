-- Allow-list firewall on new connections, the Lua twin of rules/firewall.py (same verdicts, alerts and
-- forwarded packets; tests/lua/test_twins.py holds them to it).
--
-- Event: new_connection (the client's SYN, before it is forwarded). A connection passes only if an
-- entry of ALLOW admits it: the client in one of its client networks, the server in one of its server
-- networks, the server port in its ports. Anything else gets a low-severity alert and flow:reset(), so
-- the client's connect() fails at once instead of hanging.
--
-- To adapt: edit ALLOW. Networks are CIDR strings, IPv4 and IPv6 mixed ("any": every address of both);
-- ports are numbers or {first, last} ranges. Entries are tried in order; the first match allows.

local ipv4 = require('protocol/ipv4')
local tcp_connection = require('protocol/tcp_connection')

local PRIVATE = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"}

local ALLOW = {
  -- Anyone may reach the private ranges on the usual service ports.
  {clients = "any", servers = PRIVATE, ports = {22, 25, 53, 80, 443, 8080}},
}

local function networks(spec)
  if spec == "any" then spec = {"0.0.0.0/0", "::/0"} end
  local out = {}
  for i, n in ipairs(spec) do out[i] = ipv4.network(n) end
  return out
end

local function ports(spec)
  local out = {}
  for i, p in ipairs(spec) do
    local lo, hi = p, p
    if type(p) == "table" then lo, hi = p[1], p[2] end
    assert(math.type(lo) == "integer" and math.type(hi) == "integer" and 0 < lo and lo <= hi and hi <= 65535,
      "bad port or range")
    out[i] = {lo, hi}
  end
  return out
end

-- Compiled at load: a typo in ALLOW is a load error that `tcpguard check` reports.
local ENTRIES = {}
for i, e in ipairs(ALLOW) do
  ENTRIES[i] = {clients = networks(e.clients), servers = networks(e.servers), ports = ports(e.ports)}
end

local function inside(addr, nets)
  for _, n in ipairs(nets) do
    if n:contains(addr) then return true end
  end
  return false
end

local function allowed(client, server, port)
  local addresses_ok = false
  for _, e in ipairs(ENTRIES) do
    if inside(client, e.clients) and inside(server, e.servers) then
      addresses_ok = true
      for _, r in ipairs(e.ports) do
        if r[1] <= port and port <= r[2] then return true end
      end
    end
  end
  if addresses_ok then return false, string.format("connection to port %d not allowed", port) end
  return false, string.format("connection from %s to %s not allowed", tostring(client), tostring(server))
end

haka.rule{
  name = "allow_list",
  on = tcp_connection.events.new_connection,
  eval = function (flow, tcp)
    local ok, why = allowed(flow.srcip, flow.dstip, flow.dstport)
    if not ok then
      haka.alert{description = why, severity = "low"}
      flow:reset()
    end
  end
}

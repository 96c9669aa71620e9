"""The Lua side of the Haka front end, run once in each rule file's Lua state before the file.

It is trusted code: it runs with Lua's whole standard library, keeps what it needs of it in locals (the
debug hook for the instruction budget, `load` for the rules directory's helper files) and builds the
sandbox, a fresh table that is the only environment the rule file and its helpers ever see. What the
sandbox offers is Haka's API for the tcp_connection dissector; the Python objects the rules act on (the
connection, the packet, the cursor) sit under a private key of the tables the rules get, and lupa's
attribute filter (tcpguard.lua._ALLOWED) refuses every attribute of them but a few harmless ones.

Kept as a Python string rather than a `.lua` file so that it ships inside the package without package
data rules, and so a reader finds it next to the Python that calls it.
"""

from __future__ import annotations

PRELUDE = r"""
-- FILE is the rule file's name without its directory: Lua cuts chunk names in messages to 60
-- characters, and Python puts the directory back (tcpguard.lua._load_error).
local PY, FILE, DIR = ...
local LOAD_BUDGET, CALL_BUDGET, STEP = PY.load_budget, PY.call_budget, PY.step

-- What this chunk keeps of the full standard library before anything else runs.
local sethook, getinfo, getmetatable_raw = debug.sethook, debug.getinfo, debug.getmetatable
local co_create, co_resume, co_yield, co_status = coroutine.create, coroutine.resume, coroutine.yield,
  coroutine.status
local rawload, pcall, error, type, pairs, ipairs, tostring, select, setmetatable, rawget, rawset =
  load, pcall, error, type, pairs, ipairs, tostring, select, setmetatable, rawget, rawset
local s_find, s_match, s_gmatch, s_gsub, s_rep, s_format, s_byte, s_sub =
  string.find, string.match, string.gmatch, string.gsub, string.rep, string.format, string.byte, string.sub
local t_insert, t_concat, t_unpack = table.insert, table.concat, table.unpack
local mtype = math.type

-- ------------------------------------------------------------------ the instruction budget
-- One counter for every Lua thread: a count hook runs every STEP instructions on each thread that has
-- it (coroutines inherit it from the thread that creates them) and adds to it. Past the budget the hook
-- raises, and from then on raises on every instruction of that thread, so a rule that catches the error
-- with pcall is stopped again at its next instruction. The calling wrappers below are spared.
local ticks, limit, exhausted = 0, 0, false
local spared = {}
local BUDGET_MSG = "instruction budget exceeded"
local function hook()
  if exhausted then
    local f = getinfo(2, "f")
    if f and spared[f.func] then return end
    error(BUDGET_MSG, 2)
  end
  ticks = ticks + 1
  if ticks > limit then
    exhausted = true
    sethook(hook, "", 1)
    error(BUDGET_MSG, 2)
  end
end
local function arm(instructions, thread)
  -- The hook stays set between calls (setting and clearing it on each call cost as much as the rest
  -- of a call: debug.sethook writes a weak table each time); only the count is reset, and the hook
  -- put back to every STEP instructions after a call that ran out.
  ticks, limit = 0, instructions // STEP
  if exhausted or thread then
    exhausted = false
    if thread then sethook(thread, hook, "", STEP) else sethook(hook, "", STEP) end
  end
end
local MAXINT = math.maxinteger
local function disarm()
  -- Past the call, no limit: only the prelude's own code runs until the next arm.
  limit = MAXINT
  if exhausted then
    exhausted = false
    sethook(hook, "", STEP)
  end
end

-- ------------------------------------------------------------------ strings
-- Lua's pattern matcher runs in C, where no instruction hook fires: a pattern that backtracks over a
-- long subject would run unbounded. A pattern call is refused when its subject length raised to the
-- number of its quantifiers passes PATTERN_COST; plain finds are linear and always allowed.
local PATTERN_COST = 1e8
local function quantifiers(p)
  local q, i, n = 0, 1, #p
  while i <= n do
    local c = s_byte(p, i)
    if c == 37 then i = i + 1            -- '%x': the escaped character is no quantifier
    elseif c == 42 or c == 43 or c == 45 then q = q + 1 end   -- '*', '+', '-'
    i = i + 1
  end
  return q
end
local function check_pattern(s, p, name)
  if type(s) ~= "string" or type(p) ~= "string" then return end
  local q = quantifiers(p)
  if q > 0 and (#s + 1.0) ^ q > PATTERN_COST then
    error(s_format("string.%s: pattern %q has %d quantifiers: too costly on a %d-byte subject " ..
      "(use a plain find, or match a shorter piece)", name, p, q, #s), 3)
  end
end
local safe_string = {}
for k, v in pairs(string) do safe_string[k] = v end
safe_string.dump = nil
safe_string.find = function(s, p, init, plain)
  if not plain then check_pattern(s, p, "find") end
  return s_find(s, p, init, plain)
end
safe_string.match = function(s, p, init) check_pattern(s, p, "match"); return s_match(s, p, init) end
safe_string.gmatch = function(s, p, init) check_pattern(s, p, "gmatch"); return s_gmatch(s, p, init) end
safe_string.gsub = function(s, p, r, n) check_pattern(s, p, "gsub"); return s_gsub(s, p, r, n) end
safe_string.rep = function(s, n, sep)
  -- An empty string repeated 10^15 times loops in C without allocating: bound the count itself.
  if type(n) == "number" and n > PY.max_rep then
    error(s_format("string.rep: %d repetitions is more than the %d allowed", n, PY.max_rep), 2)
  end
  return s_rep(s, n, sep)
end
-- Method calls on strings ("x"):find(...) go through the string metatable: point it at the checked
-- functions, and hide it, so that the sandbox can neither reach the real library nor replace it.
local string_mt = getmetatable_raw("")
string_mt.__index = safe_string
string_mt.__metatable = false
string.dump = nil

-- ------------------------------------------------------------------ errors
local function fail(msg, level) error(msg, (level or 1) + 1) end
local function unsupported(what, level)
  error(s_format("%s is not supported by tcpguard (see docs/rules.md, Lua rules)", what), (level or 1) + 1)
end

-- ------------------------------------------------------------------ ipv4
local ipv4 = {}
local Addr, Net = {}, {}
Addr.__index = Addr
Net.__index = Net
local function parse_addr(s)
  local a, b, c, d = s_match(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
  if a > 255 or b > 255 or c > 255 or d > 255 then return nil end
  return ((a * 256 + b) * 256 + c) * 256 + d
end
local function new_addr(n) return setmetatable({_n = n}, Addr) end
function ipv4.addr(v, b, c, d)
  if type(v) == "string" then
    local n = parse_addr(v)
    if not n then fail(s_format("ipv4.addr: %q is not an IPv4 address", v), 2) end
    return new_addr(n)
  elseif mtype(v) == "integer" and b ~= nil then
    return new_addr(((v * 256 + b) * 256 + c) * 256 + d)
  elseif mtype(v) == "integer" and v >= 0 and v <= 0xffffffff then
    return new_addr(v)
  end
  fail("ipv4.addr: expects \"a.b.c.d\", a 32-bit number or four bytes", 2)
end
function Addr.__tostring(a)
  local n = a._n
  return s_format("%d.%d.%d.%d", n >> 24 & 255, n >> 16 & 255, n >> 8 & 255, n & 255)
end
function Addr.__eq(a, b) return a._n == b._n end
function Addr.__lt(a, b) return a._n < b._n end
function Addr.__le(a, b) return a._n <= b._n end
function Addr:packed() return s_format("%c%c%c%c", self._n >> 24 & 255, self._n >> 16 & 255,
  self._n >> 8 & 255, self._n & 255) end

-- IPv6 addresses (tcpguard carries both; Haka's ipv4 module has only the first): a table of the 16
-- bytes, printed in full hex groups, compared by bytes.
local Addr6 = {}
Addr6.__index = Addr6
function Addr6.__tostring(a) return PY.addr_text(a._b) end
function Addr6.__eq(a, b) return a._b == b._b end
function Addr6:packed() return self._b end

local function addr_of(packed)
  if #packed == 4 then
    local a, b, c, d = s_byte(packed, 1, 4)
    return new_addr(((a * 256 + b) * 256 + c) * 256 + d)
  end
  return setmetatable({_b = packed}, Addr6)
end

function ipv4.network(v, mask)
  local net, bits
  if type(v) == "string" and s_find(v, ":", 1, true) then
    -- An IPv6 network (a tcpguard extension: Haka's ipv4 module has none): its 16 bytes and prefix.
    local packed, n = PY.net6(v)
    if packed == nil then fail(s_format("ipv4.network: %q is not an IPv6 network", v), 2) end
    return setmetatable({_b6 = packed, _bits = n}, Net)
  elseif type(v) == "string" then
    local a, m = s_match(v, "^([%d%.]+)/(%d+)$")
    if not a then a, m = v, "32" end
    net, bits = parse_addr(a), tonumber(m)
    if not net or bits > 32 then fail(s_format("ipv4.network: %q is not an IPv4 network", v), 2) end
  elseif getmetatable_raw(v) == Addr and mtype(mask) == "integer" and mask >= 0 and mask <= 32 then
    net, bits = v._n, mask
  else
    fail("ipv4.network: expects \"a.b.c.d/n\" or (ipv4.addr, mask)", 2)
  end
  local m = bits == 0 and 0 or (0xffffffff << (32 - bits)) & 0xffffffff
  return setmetatable({_net = net & m, _mask = m, _bits = bits}, Net)
end
local function contains6(net, b)
  local whole, rest = net._bits // 8, net._bits % 8
  if whole > 0 and s_sub(b, 1, whole) ~= s_sub(net._b6, 1, whole) then return false end
  if rest == 0 then return true end
  local m = (0xff << (8 - rest)) & 0xff
  return (s_byte(b, whole + 1) & m) == (s_byte(net._b6, whole + 1) & m)
end
function Net:contains(a)
  local mt = getmetatable_raw(a)
  if self._b6 then return mt == Addr6 and contains6(self, a._b) end
  return mt == Addr and (a._n & self._mask) == self._net
end
Net.__call = Net.contains           -- a network is also a policy criterion
function Net.__tostring(n)
  if n._b6 then return PY.addr_text(n._b6) .. "/" .. n._bits end
  return tostring(new_addr(n._net)) .. "/" .. n._bits
end
function Net.__eq(a, b) return a._net == b._net and a._b6 == b._b6 and a._bits == b._bits end
ipv4.events = setmetatable({}, {__index = function(_, k)
  unsupported(s_format("the ipv4 dissector's event %q (tcpguard hands rules TCP connections only)",
    tostring(k)), 2) end})

-- ------------------------------------------------------------------ events and dissectors
local Event = {}
Event.__index = Event
Event.__tostring = function(e) return "event " .. e.name end
local EVENTS = {}
for _, name in ipairs({"new_connection", "receive_data", "end_connection"}) do
  EVENTS[name] = setmetatable({name = name}, Event)
end
local function strict(tbl, what)
  return setmetatable(tbl, {__index = function(_, k)
    unsupported(s_format("%s %q", what, tostring(k)), 2) end})
end

local Policy = {}
Policy.__index = Policy
local POLICIES = {}
local function new_policy(name, on)
  return setmetatable({name = name, entries = {}, on = on}, Policy)
end
local tcp_connection = {
  name = "tcp_connection",
  events = strict({new_connection = EVENTS.new_connection, receive_data = EVENTS.receive_data,
    end_connection = EVENTS.end_connection}, "tcp_connection event"),
}
POLICIES.new_connection = new_policy("new connection", "new_connection")
tcp_connection.policies = strict({new_connection = POLICIES.new_connection}, "tcp_connection policy")
local tcp = {name = "tcp", events = strict({}, "tcp event"), policies = strict({}, "tcp policy")}
tcp_connection.helper = strict({}, "tcp_connection.helper")
local ipv4_dissector = {name = "ipv4", events = ipv4.events, policies = strict({}, "ipv4 policy")}
local dissectors = strict({tcp_connection = tcp_connection, tcp = tcp, ipv4 = ipv4_dissector},
  "the dissector")

-- ------------------------------------------------------------------ connection, packet, streams
-- A flow table per event, over the Python connection. The fields a rule sets on it (Haka's flow
-- objects take any) go to a Lua table kept in the connection's store, so they live as long as the
-- connection and no longer; `stores` only caches it by connection id.
-- No Python object is handed to Lua per call (lupa wraps each in a new userdata, which cost more than
-- the rest of a call): the flow table holds the connection's id, addresses and ports, and its actions
-- go to PY.act(id, what), which Python applies to the connection of the call running now (and refuses
-- for any other: a flow table kept from an earlier call cannot act on a connection it is not).
local ID, CLI, SRV, OBJ, ST, SER = {}, {}, {}, {}, {}, {}
-- Each rule call (and each streamed coroutine) has a serial number; the flow and packet tables made
-- for it carry it, and act only while it is the current one.
local serial, current_serial = 0, nil
local function own(t)
  if rawget(t, SER) ~= current_serial then
    fail("this flow is not the connection of the rule call running now", 3)
  end
  return rawget(t, ID)
end
local Flow = {}
function Flow.__index(f, k)
  local v = Flow[k]
  if v ~= nil then return v end
  if k == "srcip" then v = addr_of(rawget(f, CLI))
  elseif k == "dstip" then v = addr_of(rawget(f, SRV))
  else
    local st = rawget(f, ST)
    if st == nil then return nil end
    return st[k]
  end
  rawset(f, k, v)
  return v
end
function Flow.__newindex(f, k, v)
  if k == "srcip" or k == "dstip" or Flow[k] ~= nil then
    fail(s_format("flow.%s is read-only", tostring(k)), 2)
  end
  local st = rawget(f, ST)
  if st == nil then
    st = PY.flow_store(own(f))
    rawset(f, ST, st)
  end
  st[k] = v
end
Flow.__tostring = function(f) return "tcp_connection " .. tostring(f.srcip) .. ":" .. f.srcport ..
  " -> " .. tostring(f.dstip) .. ":" .. f.dstport end
function Flow:drop() PY.act(own(self), "drop") end
function Flow:reset() PY.act(own(self), "reset") end
function Flow:halfreset() PY.act(own(self), "halfreset") end
function Flow:send(direction)
  if direction ~= nil and direction ~= "up" and direction ~= "down" then
    fail("flow:send: direction is 'up', 'down' or nil", 2)
  end
  PY.act(own(self), "send", direction)
end
function Flow:can_continue() return not PY.blocked(own(self)) end
function Flow:select_next_dissector()
  unsupported("flow:select_next_dissector (no dissector above TCP)", 2)
end
function Flow:streamed() unsupported("flow:streamed", 2) end
local function flow_of(id, client, server, cport, sport, st, ser)
  return setmetatable({[ID] = id, [CLI] = client, [SRV] = server, [ST] = st, [SER] = ser,
    srcport = cport, dstport = sport}, Flow)
end

-- The packet of new_connection: Haka's TcpDissector fields, read on demand from the packet of the
-- call running now (PY.pkt).
local Packet = {}
local FLAGS = {fin = 1, syn = 2, rst = 4, psh = 8, ack = 16, urg = 32, ecn = 64, ece = 64, cwr = 128}
local Flags = {__index = function(t, k)
  local bit = FLAGS[k]
  if bit == nil then return nil end
  return t._v & bit ~= 0
end}
local PKT_FIELDS = {srcport = "sport", dstport = "dport", seq = "seq", ack_seq = "ack",
  window_size = "window", urgent_pointer = "urgptr", hdr_len = "tcp_hlen"}
function Packet.__index(p, k)
  local v = Packet[k]
  if v ~= nil then return v end
  local id = own(p)
  local field = PKT_FIELDS[k]
  if field then v = PY.pkt(id, field)
  elseif k == "flags" then local f = PY.pkt(id, "flags"); v = setmetatable({_v = f, all = f}, Flags)
  elseif k == "payload" then local s = PY.pkt(id, "payload"); v = PY.sub(s, 0, #s)
  elseif k == "ip" then
    v = {src = addr_of(PY.pkt(id, "src")), dst = addr_of(PY.pkt(id, "dst")), version = PY.pkt(id, "version")}
  else return nil end
  rawset(p, k, v)
  return v
end
function Packet:drop() PY.act(own(self), "drop") end
function Packet:send() end
function Packet:can_continue() return not PY.blocked(own(self)) end
local function packet_of(id, ser)
  return setmetatable({[ID] = id, [SER] = ser}, Packet)
end

-- vbuffer_sub over bytes a rule may read: the new bytes of a plain receive_data, or what a streamed
-- one takes with iter:sub(). A Lua string and a range of it.
local Sub = {}
Sub.__index = Sub
function Sub.__len(s) return s._len end
function Sub:size() return self._len end
function Sub:check_size(n) if self._len >= n then return true end return false, self._len end
function Sub:asstring()
  local v = rawget(self, "_str")
  if v == nil then v = s_sub(self._data, self._off + 1, self._off + self._len); rawset(self, "_str", v) end
  return v
end
function Sub:sub(offset, size)
  offset = offset or 0
  if offset < 0 or offset > self._len then fail("vbuffer_sub:sub: offset out of range", 2) end
  local rest = self._len - offset
  if size == nil or size == "all" or size == "available" or size > rest then size = rest end
  return PY.sub(self._data, self._off + offset, size)
end
function Sub:asnumber(endian)
  if self._len > 8 then fail("vbuffer_sub:asnumber: more than 8 bytes", 2) end
  local n, bytes = 0, {s_byte(self._data, self._off + 1, self._off + self._len)}
  if endian == "little" then
    for i = #bytes, 1, -1 do n = n * 256 + bytes[i] end
  else
    for i = 1, #bytes do n = n * 256 + bytes[i] end
  end
  return n
end
function Sub:byte(i) return s_byte(self._data, self._off + (i or 1)) end
function Sub:lookback()
  -- tcpguard: with options = {lookback = N}, the bytes before the new ones (at most N, as far as the
  -- stream kept them) and the new ones, as one sub, and how many of them came before.
  return PY.sub(self._data, 0, self._off + self._len), self._off
end
function Sub:isflat() return true end
function Sub:flatten() end
function Sub:iter()
  unsupported("vbuffer_sub:iter on a plain receive_data (use options = {streamed = true})", 2)
end
for _, m in ipairs({"setstring", "setfixedstring", "setnumber", "setbits", "erase", "replace", "select"}) do
  Sub[m] = function() unsupported("stream modification (vbuffer_sub:" .. m .. ")", 2) end
end
Sub.__tostring = Sub.asstring
PY.sub = function(data, off, len) return setmetatable({_data = data, _off = off, _len = len}, Sub) end

-- The blocking iterator of a streamed receive_data. Reads go to the Python cursor; when bytes are
-- missing the rule's coroutine yields WAIT to the Python runner, which suspends the connection's
-- greenlet until the next segment (or the end of the stream) and resumes the coroutine.
local WAIT = {}
local Iter = {}
function Iter.__index(it, k)
  local v = Iter[k]
  if v ~= nil then return v end
  if k == "iseof" then return PY.eof(rawget(it, OBJ)) end
  if k == "meter" then return PY.pos(rawget(it, OBJ)) end
  return nil
end
local function need(it, n)
  -- Bytes available after the iterator once n are there or the stream ended.
  local c = rawget(it, OBJ)
  local a = PY.avail(c)
  while a < n and not PY.ended(c) do
    co_yield(WAIT)
    a = PY.avail(c)
  end
  return a
end
function Iter:available() return PY.avail(rawget(self, OBJ)) end
function Iter:wait()
  return need(self, 1) > 0
end
function Iter:check_available(n, nonblocking)
  local a = nonblocking and PY.avail(rawget(self, OBJ)) or need(self, n)
  if a >= n then return true end
  return false, a
end
function Iter:advance(n)
  if n == "available" then return PY.skip(rawget(self, OBJ), PY.avail(rawget(self, OBJ))) end
  if n == "all" then
    local total = 0
    while need(self, 1) > 0 do total = total + PY.skip(rawget(self, OBJ), PY.avail(rawget(self, OBJ))) end
    return total
  end
  if mtype(n) ~= "integer" or n < 0 then fail("vbuffer_iterator:advance: size is a byte count", 2) end
  need(self, n)
  return PY.skip(rawget(self, OBJ), n)
end
function Iter:sub(n, split)
  local c = rawget(self, OBJ)
  if n == "available" then
    need(self, 1)
    n = PY.avail(c)
  elseif n == "all" then
    while not PY.ended(c) do co_yield(WAIT) end
    n = PY.avail(c)
  elseif mtype(n) ~= "integer" or n < 0 then
    fail("vbuffer_iterator:sub: size is a byte count, 'available' or 'all'", 2)
  end
  local data = PY.read(c, n)
  if n > 0 and #data == 0 then return nil end
  return PY.sub(data, 0, #data)
end
function Iter:foreach_available()
  return function()
    if need(self, 1) == 0 then return nil end
    return self:sub("available")
  end
end
function Iter:mark(readonly) PY.mark(rawget(self, OBJ)) end
function Iter:unmark() PY.unmark(rawget(self, OBJ)) end
function Iter:move_to() unsupported("vbuffer_iterator:move_to", 2) end
function Iter:split() unsupported("vbuffer_iterator:split", 2) end
for _, m in ipairs({"insert", "restore", "erase", "replace"}) do
  Iter[m] = function() unsupported("stream modification (vbuffer_iterator:" .. m .. ")", 2) end
end

-- ------------------------------------------------------------------ alerts and logs
local alert = {}
local function plain(v, depth)
  -- A Lua value as a JSON-friendly Python value for the alert's fields: tables become lists or
  -- string-keyed dicts, addresses their text; bounded in depth and size.
  local t = type(v)
  if t == "string" or t == "number" or t == "boolean" then return v end
  if t == "table" then
    local mt = getmetatable_raw(v)
    if mt == Addr or mt == Addr6 or mt == Net then return tostring(v) end
    if depth > 4 then return "..." end
    local out, n = {}, 0
    for k, x in pairs(v) do
      n = n + 1
      if n > 64 then break end
      out[mtype(k) == "integer" and k or tostring(k)] = plain(x, depth + 1)
    end
    return out
  end
  return tostring(v)
end
local current_id
local SEVERITY = {low = "low", medium = "medium", high = "high", info = "info"}
setmetatable(alert, {__call = function(_, a)
  if type(a) ~= "table" then fail("haka.alert: expects a table", 2) end
  local sev = SEVERITY[a.severity or "medium"]
  if not sev then fail(s_format("haka.alert: severity %q is not low, medium, high or info",
    tostring(a.severity)), 2) end
  local fields = {}
  for k, v in pairs(a) do
    if k ~= "description" and k ~= "severity" then fields[k] = plain(v, 0) end
  end
  if current_id == nil then
    fail("haka.alert outside a rule's evaluation: tcpguard alerts are about a connection", 2)
  end
  PY.alert(tostring(a.description or "alert"), sev, fields)
  return a
end})
function alert.address(...)
  local out = {}
  for i = 1, select("#", ...) do out[#out + 1] = tostring((select(i, ...))) end
  return {address = out}
end
function alert.service(...)
  local out = {}
  for i = 1, select("#", ...) do out[#out + 1] = tostring((select(i, ...))) end
  return {service = out}
end
function alert.update() unsupported("haka.alert.update", 2) end

local function fmt(msg, ...)
  if select("#", ...) > 0 then return s_format(tostring(msg), ...) end
  return tostring(msg)
end
local function logger(level)
  return function(first, msg, ...)
    -- Haka's forms: haka.log.info("section", "fmt", ...) and haka.log.info("fmt", ...).
    local ok, text
    if msg ~= nil and select("#", ...) >= 0 and type(first) == "string" and type(msg) == "string"
        and not s_find(first, "%", 1, true) then
      ok, text = pcall(fmt, msg, ...)
      if ok then text = first .. ": " .. text end
    end
    if not ok then ok, text = pcall(fmt, first, msg, ...) end
    PY.log(level, ok and text or tostring(first))
  end
end
local log = setmetatable({debug = logger("debug"), info = logger("info"), warning = logger("warning"),
  error = logger("error"), fatal = logger("error")}, {__call = function(_, ...) logger("info")(...) end})
local function print_(...)
  local out = {}
  for i = 1, select("#", ...) do out[i] = tostring((select(i, ...))) end
  PY.log("info", t_concat(out, "\t"))
end

-- ------------------------------------------------------------------ rules, groups, policies
local RULES = {}        -- {event, eval, streamed, name, line}
local function where(f)
  local i = getinfo(f, "S")
  return i.linedefined
end
local function event_of(r, what)
  local on = r.on or r.hook
  if on == nil then fail(what .. ": no 'on' event (haka.dissectors.tcp_connection.events.*)", 3) end
  if getmetatable_raw(on) ~= Event then
    fail(what .. ": 'on' is not an event of tcp_connection (tcpguard has no other dissector)", 3)
  end
  return on.name
end
local function add_rule(event, eval, options, name, what)
  if type(eval) ~= "function" then fail(what .. ": 'eval' must be a function", 3) end
  options = options or {}
  local streamed = options.streamed or false
  if streamed and event ~= "receive_data" then
    fail(what .. ": streamed is only meaningful for receive_data", 3)
  end
  -- tcpguard's own options (Haka ignores options it does not know, so a file using them still runs
  -- there): direction and lookback as @rule's, ports as @rule's ports=.
  local direction, lookback, ports = options.direction, options.lookback, nil
  if direction ~= nil and (event ~= "receive_data" or (direction ~= "up" and direction ~= "down")) then
    fail(what .. ": options.direction is 'up' or 'down', and only for receive_data", 3)
  end
  if lookback ~= nil and (event ~= "receive_data" or streamed or mtype(lookback) ~= "integer"
      or lookback < 0 or lookback > 65536) then
    fail(what .. ": options.lookback is a byte count 0-65536, only for plain receive_data", 3)
  end
  if options.ports ~= nil then
    if type(options.ports) ~= "table" or #options.ports == 0 then
      fail(what .. ": options.ports is a non-empty list of port numbers", 3)
    end
    ports = {}
    for i, p in ipairs(options.ports) do
      if mtype(p) ~= "integer" or p < 0 or p > 65535 then
        fail(what .. ": options.ports holds " .. tostring(p) .. ": ports are integers 0-65535", 3)
      end
      ports[i] = p
    end
  end
  local line = where(eval)
  RULES[#RULES + 1] = {event = event, eval = eval, streamed = streamed and true or false,
    name = name, line = line, direction = direction, lookback = lookback or 0, ports = ports}
end

local haka = {}
function haka.rule(r)
  if type(r) ~= "table" then fail("haka.rule: expects a table", 2) end
  local event = event_of(r, "haka.rule")
  local options = r.options or {}
  if r.streamed ~= nil then options = {streamed = r.streamed} end
  add_rule(event, r.eval, options, r.name, "haka.rule")
end

local Group = {}
Group.__index = Group
function haka.rule_group(g)
  if type(g) ~= "table" then fail("haka.rule_group: expects a table", 2) end
  local event = event_of(g, "haka.rule_group")
  for _, k in ipairs({"init", "continue", "final"}) do
    if g[k] ~= nil and type(g[k]) ~= "function" then
      fail("haka.rule_group: " .. k .. " must be a function", 2)
    end
  end
  local options = g.options or {}
  if options.streamed then unsupported("a streamed rule group", 2) end
  local group = setmetatable({name = g.name, rules = {}, init = g.init or function() end,
    continue = g.continue or function() return true end, final = g.final or function() end}, Group)
  local function eval(...)
    group.init(...)
    for _, rule in ipairs(group.rules) do
      local ret = rule(...)
      if PY.blocked(current_id) then return end
      if not group.continue(ret, ...) then return end
    end
    group.final(...)
  end
  add_rule(event, eval, options, g.name, "haka.rule_group")
  RULES[#RULES].line = getinfo(2, "l").currentline
  return group
end
function Group:rule(r)
  if type(r) ~= "table" or type(r.eval) ~= "function" then
    fail("group:rule: expects {eval = function}", 2)
  end
  self.rules[#self.rules + 1] = r.eval
end

local policy = {}
local function new_criterion(create, compare)
  local mt = {__call = compare}
  return function(...) return setmetatable(create(...), mt) end
end
policy.new_criterion = new_criterion
policy.set = new_criterion(function(list)
  local set = {}
  for _, m in pairs(list) do set[m] = true end
  return set
end, function(self, value) return self[value] == true end)
policy.range = new_criterion(function(min, max)
  if not (min <= max) then fail("haka.policy.range: invalid bounds", 3) end
  return {min = min, max = max}
end, function(self, value) return value ~= nil and value >= self.min and value <= self.max end)
policy.outofrange = new_criterion(function(min, max)
  if not (min <= max) then fail("haka.policy.outofrange: invalid bounds", 3) end
  return {min = min, max = max}
end, function(self, value) return value ~= nil and (value < self.min or value > self.max) end)
policy.ipv4_in_network = new_criterion(function(net)
  if type(net) == "string" then net = ipv4.network(net) end
  if getmetatable_raw(net) ~= Net then fail("haka.policy.ipv4_in_network: expects an ipv4.network", 3) end
  return {net = net}
end, function(self, value) return self.net:contains(value) end)
function policy.accept() end
function policy.drop(_, ctx) ctx:drop() end
function policy.reset(_, ctx) ctx:reset() end
function policy.alert(a)
  a = a or {}
  return function(pol, ctx, values, desc)
    local out = {}
    for k, v in pairs(a) do out[k] = v end
    for k, v in pairs(desc) do if out[k] == nil then out[k] = v end end
    if out.description == nil then out.description = pol.name end
    alert(out)
  end
end
function policy.log(section, level, message, ...)
  local args = {...}
  return function() log[level](section, message, t_unpack(args)) end
end
function policy.new() unsupported("haka.policy.new (tcpguard's policies are those of tcp_connection)", 2) end

function Policy:apply(p)
  -- Haka's order of precedence: every entry is tried in the order registered, and the *last* one
  -- whose criteria all hold decides.
  local chosen
  local values = p.values
  for _, entry in ipairs(self.entries) do
    local ok = true
    for _, c in ipairs(entry.criteria) do
      local v = values[c.name]
      local mt = type(c.value) == "table" and getmetatable_raw(c.value)
      if mt and rawget(mt, "__call") then
        if not c.value(v) then ok = false; break end
      elseif v ~= c.value then ok = false; break end
    end
    if ok then chosen = entry end
  end
  if chosen then
    for _, action in ipairs(chosen.actions) do action(self, p.ctx, values, p.desc or {}) end
  end
end

local policy_rule_added = false
setmetatable(policy, {__call = function(_, p)
  if type(p) ~= "table" then fail("haka.policy: expects a table", 2) end
  local on = p.on
  if getmetatable_raw(on) ~= Policy then
    fail("haka.policy: 'on' must be a policy (haka.dissectors.tcp_connection.policies.new_connection)", 2)
  end
  local actions = p.action
  if type(actions) == "function" then actions = {actions}
  elseif type(actions) == "table" then
    for _, f in ipairs(actions) do
      if type(f) ~= "function" then
        fail("haka.policy: action must be a function or a list of functions", 2)
      end
    end
  else fail("haka.policy: action must be a function or a list of functions", 2) end
  local criteria = {}
  for k, v in pairs(p) do
    if k ~= "on" and k ~= "name" and k ~= "action" then
      if k ~= "srcip" and k ~= "dstip" and k ~= "srcport" and k ~= "dstport" then
        fail(s_format("haka.policy: criterion %q: new_connection policies know srcip, dstip, srcport " ..
          "and dstport", tostring(k)), 2)
      end
      criteria[#criteria + 1] = {name = k, value = v}
    end
  end
  table.sort(criteria, function(a, b) return a.name < b.name end)
  on.entries[#on.entries + 1] = {name = p.name, criteria = criteria, actions = actions}
  if not policy_rule_added then
    -- As tcp_connection.lua does, a rule on new_connection applies the policy; here it is placed
    -- where the file's first policy is declared.
    policy_rule_added = true
    RULES[#RULES + 1] = {event = "new_connection", streamed = false, name = "policy",
      line = getinfo(2, "l").currentline, eval = function(flow, pkt)
        on:apply{ctx = flow, values = {srcip = flow.srcip, dstip = flow.dstip,
          srcport = flow.srcport, dstport = flow.dstport},
          desc = {sources = {alert.address(flow.srcip), alert.service("tcp/" .. flow.srcport)},
                  targets = {alert.address(flow.dstip), alert.service("tcp/" .. flow.dstport)}}}
      end}
  end
end})

haka.alert = alert
haka.log = log
haka.policy = policy
haka.dissectors = dissectors
haka.event = strict({}, "haka.event")
haka.abort = function() error({abort = true}, 2) end
haka.debugger = function() end
for _, k in ipairs({"grammar", "state_machine", "dissector", "helper", "context", "console", "regexp",
    "log_section", "rule_summary", "sample", "module"}) do
  haka[k] = nil
end
setmetatable(haka, {__index = function(_, k) unsupported("haka." .. tostring(k), 2) end})

-- ------------------------------------------------------------------ the sandbox
local env = {}
local MODULES = {
  ["protocol/ipv4"] = ipv4,
  ["protocol/tcp"] = tcp,
  ["protocol/tcp_connection"] = tcp_connection,
  ["protocol/tcp-connection"] = tcp_connection,
  ["protocol/raw"] = {},
}
local loaded = {}
local loading = {}
local function require_(name)
  if type(name) ~= "string" then fail("require: module name must be a string", 2) end
  local m = MODULES[name]
  if m ~= nil then return m end
  if loaded[name] ~= nil then return loaded[name] end
  if s_match(name, "^_[%w_]+$") then
    if loading[name] then fail(s_format("require(%q): circular require", name), 2) end
    local src = PY.read_helper(DIR, name)
    if src == nil then fail(s_format("require(%q): no file %s.lua in the rules directory", name, name), 2) end
    local chunk, err = rawload(src, "@" .. name .. ".lua", "t", env)
    if not chunk then error(err, 0) end
    loading[name] = true
    local ok, res = pcall(chunk, name)
    loading[name] = nil
    if not ok then error(res, 0) end
    if res == nil then res = true end
    loaded[name] = res
    return res
  end
  unsupported(s_format("require(%q): only protocol/ipv4, protocol/tcp, protocol/tcp_connection and " ..
    "helper files _NAME.lua of the rules directory are available; the module", name), 2)
end

local function safe_setmetatable(t, mt)
  -- A __gc finalizer runs with hooks off (Lua stops debug hooks during GC metamethods): it would be
  -- outside the instruction budget, so metatables carrying one are refused.
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    fail("setmetatable: __gc finalizers are not allowed in rules", 2)
  end
  return setmetatable(t, mt)
end
local function safe_getmetatable(v)
  if type(v) ~= "table" then return nil end
  return getmetatable(v)
end

for _, k in ipairs({"assert", "error", "ipairs", "next", "pairs", "pcall", "rawequal", "rawget", "rawlen",
    "rawset", "select", "tonumber", "tostring", "type", "xpcall", "_VERSION"}) do
  env[k] = _G[k]
end
env.setmetatable = safe_setmetatable
env.getmetatable = safe_getmetatable
env.print = print_
env.require = require_
env.string = safe_string
env.table = {}
for k, v in pairs(table) do env.table[k] = v end
env.math = {}
for k, v in pairs(math) do env.math[k] = v end
env.utf8 = {}
for k, v in pairs(utf8) do env.utf8[k] = v end
env.coroutine = {}
for k, v in pairs(coroutine) do env.coroutine[k] = v end
-- A new coroutine inherits the C side of the count hook but not debug.sethook's Lua function (kept per
-- thread): without this, a loop inside a coroutine would run unbudgeted.
local function co_create_hooked(f)
  local co = co_create(f)
  sethook(co, hook, "", STEP)
  return co
end
env.coroutine.create = co_create_hooked
env.coroutine.wrap = function(f)
  local co = co_create_hooked(f)
  return function(...)
    local r = table.pack(co_resume(co, ...))
    if r[1] then return t_unpack(r, 2, r.n) end
    error(r[2], 0)
  end
end
env.os = {time = os.time, clock = os.clock, date = os.date, difftime = os.difftime}
env.haka = haka
env.ipv4 = ipv4
env.tcp_connection = tcp_connection
env.unpack = t_unpack
env._G = env

-- ------------------------------------------------------------------ entry points for Python
local api = {}

local function errtext(e)
  -- Called with the budget off: never run a metamethod of the rule's error object here.
  if type(e) == "string" then return e end
  if type(e) == "table" and rawget(e, "abort") == true then return nil end   -- haka.abort()
  if type(e) == "number" then return s_format("%s", e) end
  if type(e) == "userdata" then return tostring(e) end     -- a Python exception from a callback
  return "error object of type " .. type(e)
end


function api.load(src)
  -- Run the rule file's top level under the load budget. Returns nil or the error text.
  local chunk, err = rawload(src, "@" .. FILE, "t", env)
  if not chunk then return err end
  sethook(hook, "", STEP)
  arm(LOAD_BUDGET)
  local ok, res = pcall(chunk)
  local out_of_budget = exhausted
  disarm()
  if not ok then return errtext(res) or (FILE .. ": haka.abort() at load") end
  if out_of_budget then return FILE .. ": " .. BUDGET_MSG .. " at load (the error was caught)" end
  return nil
end
spared[api.load] = true

function api.rules()
  -- The registered rules as (event, streamed, name, line) rows for Python.
  local out = {}
  for i, r in ipairs(RULES) do
    out[i] = {r.event, r.streamed, r.name or false, r.line, r.direction or false, r.lookback or 0,
      r.ports or false}
  end
  return out
end


function api.call(i, id, client, server, cport, sport, st, a, b, k)
  -- A plain listener: new_connection(flow, pkt), receive_data(flow, sub, direction), end_connection.
  local r = RULES[i]
  serial = serial + 1
  current_serial = serial
  local flow = flow_of(id, client, server, cport, sport, st, serial)
  current_id = id
  arm(CALL_BUDGET)
  local ok, err
  local ev = r.event
  if ev == "receive_data" then
    ok, err = pcall(r.eval, flow, PY.sub(a, k, #a - k), b)
  elseif ev == "new_connection" then
    ok, err = pcall(r.eval, flow, packet_of(id, serial))
  else
    ok, err = pcall(r.eval, flow)
  end
  local out_of_budget = exhausted
  disarm()
  current_id, current_serial = nil, nil
  if not ok then return errtext(err) end
  if out_of_budget then return BUDGET_MSG .. " (the rule caught the budget error and returned)" end
  return nil
end
spared[api.call] = true

function api.start(i, id, client, server, cport, sport, st, cur, direction)
  -- A streamed listener: a coroutine per flow and direction, resumed by Python as bytes arrive.
  local r = RULES[i]
  serial = serial + 1
  local flow = flow_of(id, client, server, cport, sport, st, serial)
  local it = setmetatable({[OBJ] = cur}, Iter)
  -- Handed to Python inside a table: lupa gives a bare coroutine back as a Python iterator object.
  return {co = co_create(function() return r.eval(flow, it, direction) end), id = id, serial = serial}
end

function api.resume(h)
  -- Resume until the coroutine waits for bytes ("wait"), returns ("done") or fails ("error", text).
  local co = h.co
  current_id = h.id
  current_serial = h.serial
  arm(CALL_BUDGET, co)
  local ok, res = co_resume(co)
  local out_of_budget = exhausted
  disarm()
  current_id, current_serial = nil, nil
  if not ok then
    local e = errtext(res)
    if e == nil then return "done" end
    return "error", e
  end
  if out_of_budget then return "error", BUDGET_MSG .. " (the rule caught the budget error and went on)" end
  if co_status(co) == "dead" then return "done" end
  if res ~= WAIT then
    return "error", "a streamed rule yielded (coroutine.yield outside a coroutine of its own)"
  end
  return "wait"
end
spared[api.resume] = true
spared[arm] = true
spared[disarm] = true

Iter.__metatable = false
Flow.__metatable = false
Packet.__metatable = false
Sub.__metatable = false
Addr.__metatable = false
Addr6.__metatable = false
Net.__metatable = false
Event.__metatable = false
Policy.__metatable = false
Group.__metatable = false
return api
"""

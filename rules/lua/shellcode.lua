-- Reset connections whose client sends a shell-code pattern, however the sender splits it: the Lua
-- twin of rules/shellcode.py (same verdicts, alerts and forwarded packets; tests/lua/test_twins.py).
--
-- Event: receive_data, plain (not streamed), client to server only (tcpguard's options.direction).
-- Haka hands a plain listener the new bytes only; tcpguard's options.lookback also keeps the LOOKBACK
-- bytes before them, which current:lookback() returns with the new ones, so a pattern split over many
-- segments is found on the one completing it. A match must end in the new bytes (one before them was
-- seen by the previous call). Of several, the one complete first in the stream is reported, the longer
-- one when two end at the same byte.
--
-- To adapt: edit PATTERNS (plain strings, searched byte for byte, no Lua patterns); LABELS are the
-- names the alerts give them.

local tcp_connection = require('protocol/tcp_connection')

local PATTERNS = {
  "/bin/sh",
  "/bin/bash",
  "cmd.exe",
  "\x31\xc0\x50\x68//sh",   -- x86 execve("/bin//sh") prologue
  string.rep("\x90", 32),   -- a NOP sled
}
-- As the Python rule prints them (its bytes' repr), so that both raise the same alert.
local LABELS = {
  "b'/bin/sh'", "b'/bin/bash'", "b'cmd.exe'", "b'1\\xc0Ph//sh'", "b'" .. string.rep("\\x90", 32) .. "'",
}

local find, max = string.find, math.max   -- locals: a global lookup per pattern per segment adds up

local LOOKBACK = 0
for _, p in ipairs(PATTERNS) do LOOKBACK = math.max(LOOKBACK, #p - 1) end

haka.rule{
  name = "no_shellcode",
  on = tcp_connection.events.receive_data,
  options = {direction = "up", lookback = LOOKBACK},
  eval = function (flow, current, direction)
    local whole, before = current:lookback()
    local data = whole:asstring()
    local best, best_end, best_len
    for i = 1, #PATTERNS do
      local p = PATTERNS[i]
      local s = find(data, p, max(1, before - #p + 2), true)
      if s then
        local e = s + #p
        if best == nil or e < best_end or (e == best_end and s < best_end - best_len) then
          best, best_end, best_len = i, e, #p
        end
      end
    end
    if best then
      haka.alert{description = "shell-code pattern " .. LABELS[best] .. " from the client", severity = "high"}
      flow:reset()
    end
  end
}

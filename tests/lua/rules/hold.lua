-- Streamed receive_data holding packets: the client's first line is held (iter:mark) until it is
-- complete and judged; a first line starting with "BAD" drops the connection before any of its bytes
-- reach the server, any other is released (iter:unmark, flow:send) and the rule is done.
local tcp_connection = require('protocol/tcp_connection')

haka.rule{
  name = "first_line",
  on = tcp_connection.events.receive_data,
  options = {streamed = true},
  eval = function (flow, iter, direction)
    if direction ~= "up" then return end
    iter:mark()
    local line = ""
    while iter:wait() do
      local chunk = iter:sub("available"):asstring()
      line = line .. chunk
      if line:find("\n", 1, true) then break end
    end
    if line:sub(1, 3) == "BAD" then
      flow:drop()
      return
    end
    iter:unmark()
    flow:send("up")
  end
}

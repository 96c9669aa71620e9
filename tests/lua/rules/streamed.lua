-- Streamed receive_data: a client protocol of messages, each a two-byte length and its bytes, read
-- with the blocking iterator however the client splits them. A message "evil" resets the connection;
-- the messages' count is alerted at the end of the stream.
local tcp_connection = require('protocol/tcp_connection')

haka.rule{
  name = "messages",
  on = tcp_connection.events.receive_data,
  options = {streamed = true},
  eval = function (flow, iter, direction)
    if direction ~= "up" then return end
    local count = 0
    while iter:check_available(2) do
      local len = iter:sub(2):asnumber()
      local enough, have = iter:check_available(len)
      if not enough then
        haka.alert{description = string.format("truncated message: %d of %d bytes", have, len),
          severity = "low"}
        return
      end
      local msg = iter:sub(len):asstring()
      count = count + 1
      if msg == "evil" then
        haka.alert{description = "evil message", severity = "high"}
        flow:reset()
        return
      end
    end
    haka.alert{description = string.format("%d messages", count), severity = "info"}
  end
}

-- Plain receive_data: the new bytes as a vbuffer_sub (#, asstring, sub, asnumber, byte, check_size),
-- fields kept on the flow between calls, and end_connection reading them.
local tcp_connection = require('protocol/tcp_connection')

haka.rule{
  name = "reader",
  on = tcp_connection.events.receive_data,
  eval = function (flow, current, direction)
    flow.bytes = (flow.bytes or 0) + #current
    flow.calls = (flow.calls or 0) + 1
    if direction == "up" then
      local head = current:sub(0, 4):asstring()
      if head == "QUIT" then
        flow:drop()
      elseif head == "LEN:" and current:check_size(6) then
        -- a two-byte big-endian length after the tag: over 1000 is refused
        if current:sub(4, 2):asnumber() > 1000 then flow:reset() end
      elseif current:byte(1) == 0 then
        haka.alert{description = "NUL first byte", severity = "info"}
      end
    elseif current:asstring():find("secret", 1, true) then
      flow:halfreset()
    end
  end
}

haka.rule{
  name = "summary",
  on = tcp_connection.events.end_connection,
  eval = function (flow)
    haka.alert{description = string.format("%d bytes in %d calls", flow.bytes or 0, flow.calls or 0),
      severity = "info"}
  end
}

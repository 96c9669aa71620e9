-- A streamed rule in the older spelling (hook =, streamed = true at the top level), scanning the
-- stream chunk by chunk with foreach_available, keeping the tail of the previous chunk so that a
-- pattern split between chunks is found.
haka.rule{
  hook = tcp_connection.events.receive_data,
  streamed = true,
  eval = function (flow, iter)
    local tail = ""
    for sub in iter:foreach_available() do
      local data = tail .. sub:asstring()
      if data:find("/bin/sh", 1, true) then
        haka.alert{description = "/bin/sh shellcode detected",
          sources = haka.alert.address(flow.srcip), targets = haka.alert.address(flow.dstip)}
        flow:drop()
        return
      end
      tail = data:sub(-6)
    end
  end
}

-- new_connection: the flow's fields, the packet's fields, and each action, by server port.
local tcp_connection = require('protocol/tcp_connection')

haka.rule{
  name = "by_port",
  on = tcp_connection.events.new_connection,
  eval = function (flow, pkt)
    assert(pkt.flags.syn and not pkt.flags.ack, "new_connection is the client's SYN")
    assert(pkt.srcport == flow.srcport and pkt.dstport == flow.dstport)
    assert(tostring(pkt.ip.src) == tostring(flow.srcip) and pkt.ip.dst == flow.dstip)
    if flow.dstport == 23 then
      haka.alert{
        description = string.format("telnet from %s:%d", flow.srcip, flow.srcport),
        severity = "low",
        sources = {haka.alert.address(flow.srcip), haka.alert.service("tcp/" .. flow.srcport)},
        targets = {haka.alert.address(flow.dstip), haka.alert.service("tcp/" .. flow.dstport)},
      }
      flow:reset()
    elseif flow.dstport == 24 then
      pkt:drop()
    elseif flow.dstport == 25 then
      flow:halfreset()
    elseif flow.dstport == 26 then
      flow:drop()
    elseif flow.dstport == 27 then
      haka.log.info("connect", "seq %d window %d", pkt.seq, pkt.window_size)
      print("port", flow.dstport)
      error("a rule that fails")
    end
  end
}

-- A rule group on new_connection in Haka's documented shape: init runs first, each rule in order
-- while continue says so, final only when no rule stopped the group.
local tcp_connection = require('protocol/tcp_connection')
local ipv4 = require('protocol/ipv4')

local clients = ipv4.network("192.168.10.0/25")
local servers = ipv4.network("192.168.20.0/25")

local group = haka.rule_group{
  name = "filter",
  on = tcp_connection.events.new_connection,
  init = function (flow, pkt)
    haka.log.debug("filter", "entering packet filtering rules: %d --> %d", pkt.srcport, pkt.dstport)
  end,
  continue = function (ret, flow, pkt)
    return not ret
  end,
  final = function (flow, pkt)
    haka.alert{description = "Packet dropped: drop by default",
      sources = haka.alert.address(pkt.ip.src), targets = haka.alert.address(pkt.ip.dst)}
    pkt:drop()
  end,
}

group:rule{
  eval = function (flow, pkt)
    if clients:contains(pkt.ip.src) and servers:contains(pkt.ip.dst) and pkt.dstport == 80 then
      return true
    end
  end
}

group:rule{
  eval = function (flow, pkt)
    if clients:contains(pkt.ip.src) and servers:contains(pkt.ip.dst) and pkt.dstport == 22 then
      haka.log.warning("filter", "authorizing ssh traffic")
      return true
    end
  end
}

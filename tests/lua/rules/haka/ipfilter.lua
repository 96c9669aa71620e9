-- Haka's workshop ipfilter.lua filters on the ipv4 dissector's packets, which tcpguard does not hand
-- to rules.
local ipv4 = require('protocol/ipv4')

haka.rule{
  hook = ipv4.events.receive_packet,
  eval = function (pkt) end
}

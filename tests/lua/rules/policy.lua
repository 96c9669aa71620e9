-- Policies on new connections, Haka's way: every entry whose criteria all hold is eligible, and the
-- last eligible one registered decides. Criteria: a value, an ipv4.network, ipv4_in_network, set,
-- range, outofrange; actions: accept, drop, reset, alert{...}, or a list of them.
local tcp_connection = require('protocol/tcp_connection')
local ipv4 = require('protocol/ipv4')

haka.policy{
  on = haka.dissectors.tcp_connection.policies.new_connection,
  name = "default: refuse",
  action = {haka.policy.alert{severity = "low"}, haka.policy.reset},
}

haka.policy{
  on = tcp_connection.policies.new_connection,
  name = "web for the lan",
  srcip = haka.policy.ipv4_in_network("10.0.0.0/8"),
  dstport = haka.policy.set{80, 443},
  action = haka.policy.accept,
}

haka.policy{
  on = tcp_connection.policies.new_connection,
  name = "high ports for the admin network",
  srcip = ipv4.network("10.1.0.0/16"),
  dstport = haka.policy.range(8000, 8999),
  action = haka.policy.accept,
}

haka.policy{
  on = tcp_connection.policies.new_connection,
  name = "one server is closed, whoever asks",
  dstip = ipv4.addr("10.0.0.66"),
  action = {haka.policy.alert{description = "closed server", severity = "medium"}, haka.policy.drop},
}

haka.policy{
  on = tcp_connection.policies.new_connection,
  name = "ports outside 1-1023 from the guests",
  srcip = ipv4.network("10.9.0.0/16"),
  dstport = haka.policy.outofrange(1, 1023),
  action = haka.policy.drop,
}

-- Haka's stream modification (the tcp streaminsert tests) has no equivalent in tcpguard.
haka.rule{
  on = haka.dissectors.tcp_connection.events.receive_data,
  options = {streamed = true},
  eval = function (flow, iter, direction)
    iter:advance(4)
    iter:insert(haka.vbuffer_from("inserted"))
  end
}

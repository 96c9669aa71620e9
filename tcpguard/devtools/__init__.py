"""The developer's tools, apart from the product: `tcpguard lab` (a gateway with real clients and servers
in network namespaces, to try rules on) and `tcpguard bench` (tcpguard against the alternatives on that
network). The daemon, the control socket and the offline tools never import them."""

"""The control socket: `tcpguard version`, `status`, `connections`, `drop`, `reset` and `reload` on a
running daemon.

`protocol`: what goes over the socket (JSON lines, requests, answers, connection ids and filters);
`access`: who may connect; `server`: the listening socket, the worker's inbox and the links to the
workers; `dispatch`: the one table of commands, and the dispatcher that fans a request out by it;
`client`: the operator's side (the subcommands, the tables they print). The daemon imports the server side,
the CLI only the client; neither imports the other.
"""

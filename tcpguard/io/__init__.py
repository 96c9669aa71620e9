"""Adapters between the sans-IO core and the outside world: capture files, NFQUEUE, sockets."""

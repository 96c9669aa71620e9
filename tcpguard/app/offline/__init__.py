"""The offline tools: the engine run over a capture instead of a queue (replay, trace, cost) and the
golden recorder. Nothing here needs root or a network; the daemon never imports this package."""

"""The application around the core: configuration, daemon loop, control socket, CLI."""

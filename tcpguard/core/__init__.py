"""The sans-IO core: bytes and a clock in, decisions out. Nothing here touches a socket or the wall clock."""

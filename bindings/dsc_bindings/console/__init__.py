"""The `dsc` command: one module per concern, the client side of the protocols (top layer)."""

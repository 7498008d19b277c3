"""The HTTP bindings: one I/O-free driver, its admission rules, the async and blocking servers."""

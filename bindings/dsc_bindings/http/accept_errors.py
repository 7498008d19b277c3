"""What an ``accept()`` error means to a server that accepts many connections per wake-up (the
async binding's accept loop, http/async_server.py; dsc's uvicorn loop, http/uvicorn_loop.py)."""

from __future__ import annotations

import errno

__all__ = ["OUT_OF_RESOURCES"]

#: The process is out of descriptors or memory for now, not "this connection is bad": the
#: connections wait in the kernel's backlog, and accepting pauses (Linux keeps reporting the
#: listening socket readable meanwhile, so trying again at once would spin).
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

"""I/O bindings around dsc_core: HTTP servers, job store, filters, command line."""

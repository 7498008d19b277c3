"""Durable state: the SQLite job store and spool, job records, the page's totals."""

"""The web console: the JSON admin API under /api/, its sign-in, and the page (issue 19)."""

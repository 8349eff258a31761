"""Where compressed memory meets its users: the interactive chat loop (and, next, the HTTP server)."""

"""The cache daemon: trio servers for the data protocol and the HTTP API, auth, metrics."""

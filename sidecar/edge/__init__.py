"""The network edge: the gRPC service and server, TLS, bearer tokens, credential files."""

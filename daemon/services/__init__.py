"""gRPC service implementations (thin: validate, call the domain, convert)."""

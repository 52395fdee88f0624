"""The gRPC control plane: descriptors, leases and events; never tensor bytes."""

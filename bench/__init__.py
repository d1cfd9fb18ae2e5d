"""Benchmark of the Tidings main path against bare gRPC, bare JetStream and a naive pipeline."""

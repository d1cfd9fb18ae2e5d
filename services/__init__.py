"""Tidings services: the shared runtime and one package per bounded context."""

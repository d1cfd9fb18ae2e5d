"""The Tidings toolkit: what every service gets without writing it itself.

Service bootstrap (service), settings (config), errors and validation, the
database with its transactional outbox and relay, event encoding, streams and
durable consumers.
"""

"""The coordinator: runs federated rounds, serves the Federation gRPC service, aggregates updates.

It never dials a node: group nodes connect to it (mutually-authenticated TLS) and long-poll for
work. `coordinator.strategy` holds the aggregation rules, free of any transport.
"""

"""The consortium's Flower federation: wire protocol, pooling, site server, evaluation, report, deployment.

See docs/federation.md. Nothing heavy (flwr, torch, pandas) is imported here.
"""

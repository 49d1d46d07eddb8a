"""The consortium's Flower federation: wire protocol, pooling, site server, evaluation, report, and the locked-down
deployment (deployment, services, fleet_front, pinned_launcher, app_bundle).

See docs/federation.md. Nothing heavy (flwr, torch, pandas) is imported here.
"""

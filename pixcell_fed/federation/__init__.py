"""The consortium's Flower federation: wire protocol (protocol, transport, node_identity, validation), pooling
(pooling, transfer, staging), the site server (site_server, evaluation, evaluation_policy, query_budget), the DP
rounds (dp_rounds, dp_ledger), the coordinator's cycle (config, workflow, report), and the locked-down deployment
(deployment, services, fleet_front, pinned_launcher, app_bundle).

See docs/federation.md. Nothing heavy (flwr, torch, pandas) is imported here.
"""

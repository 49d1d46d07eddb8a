"""The demo consortium: three simulated hospitals, a loopback Flower deployment, one command."""

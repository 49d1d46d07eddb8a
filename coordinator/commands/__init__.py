"""One module per coordinator sub-command."""

"""One module per site-agent sub-command."""

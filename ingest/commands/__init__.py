"""Command-line commands, one module each."""

"""Command-line commands: each parses its flags and calls the library."""

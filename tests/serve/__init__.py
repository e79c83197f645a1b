"""Serve tests: black-box HTTP tests against a real server process."""

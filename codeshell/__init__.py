"""codeshell: run, serve, evaluate, tune and build CodeShell-family code LLMs."""

__version__ = "0.1.0"

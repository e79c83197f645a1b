"""`python -m codeshell.serve --model M ...`: the server without the `codeshell` CLI."""

from .cli import main

if __name__ == "__main__":
    main()

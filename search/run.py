"""`python -m search.run --space NAME`: the main command (implemented in search.sweep.cli)."""
import sys

from search.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())

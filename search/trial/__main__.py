"""`python -m search.trial ...`: one trial, no Ray (see search.trial.cli.main)."""
import sys

from search.trial.cli import main

sys.exit(main())

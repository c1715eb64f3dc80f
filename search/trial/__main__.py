"""`python -m search.trial ...`: one trial, no Ray (see search.trial.runner.main)."""
import sys

from search.trial.runner import main

sys.exit(main())

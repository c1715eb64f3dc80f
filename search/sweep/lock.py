"""The writer lock moved to `search/lock.py` (records: the store's writers take it, and the store sits below
the sweep). This name stays for code and tests written against it: it is the same module object, so a patch
of `search.sweep.lock.X` patches `search.lock.X`."""
import sys

from search import lock

sys.modules[__name__] = lock

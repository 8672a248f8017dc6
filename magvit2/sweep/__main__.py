"""`python -m magvit2.sweep status ...` (console script: magvit2-sweep)."""
import sys

from magvit2.sweep.status import main

if __name__ == "__main__":
    sys.exit(main())

import sys

from magvit2.sweep.status import main

sys.exit(main())

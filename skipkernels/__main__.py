import sys

from skipkernels.cli import main

sys.exit(main())

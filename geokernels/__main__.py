import sys

from geokernels.cli import main

sys.exit(main())

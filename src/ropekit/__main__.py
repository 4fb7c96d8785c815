import sys

from ropekit.cli import main

sys.exit(main())

"""``python -m ropekit``: the ``ropekit`` command (its OpenMP settings first: see ``_ropekit_launcher``)."""

import sys

from _ropekit_launcher import main, reexec_with_openmp_env

reexec_with_openmp_env()  # ropekit/__init__ has loaded torch: run again with the settings in place
sys.exit(main())

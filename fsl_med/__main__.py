"""``python -m fsl_med`` runs the ``fsl-med`` command line."""

import sys

from fsl_med.cli import main

sys.exit(main())

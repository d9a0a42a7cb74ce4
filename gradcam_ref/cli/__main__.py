"""``python -m gradcam_ref.cli``: the ``gradcam-ref`` command, for environments without its script."""

import sys

from gradcam_ref.cli import main

sys.exit(main())

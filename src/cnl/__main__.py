"""``python -m cnl ...`` (what ``torchrun ... -m cnl train ...`` runs): the ``cnl`` command."""

import sys

from .cli import main

sys.exit(main())

"""`python -m wbsr_train` (and `torchrun -m wbsr_train`) is wbsr-train."""

import sys

from .cli import train_main

sys.exit(train_main())

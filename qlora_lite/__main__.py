"""`python -m qlora_lite ...`: the same command as `qlora-lite ...`, for launchers that start a module
(`torchrun --standalone --nproc_per_node 2 -m qlora_lite train RECIPE`)."""

import sys

from .cli import main

sys.exit(main())

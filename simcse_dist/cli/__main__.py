"""`python -m simcse_dist.cli ...` is simcse-train (what torchrun, the deepspeed launcher and slurm/train.sh start)."""

import sys

from simcse_dist.cli.train import main

sys.exit(main())

"""`ray job submit --working-dir . -- python jobs/train.py [OPTIONS]`: the same as `damo train`.

Inside a Ray job, RAY_ADDRESS names the cluster and the run joins it. See `--help`.
"""

import sys

from typer.main import get_command

from damo.cli import app

if __name__ == "__main__":
    get_command(app).commands["train"](sys.argv[1:], prog_name="jobs/train.py")

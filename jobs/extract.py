"""`ray job submit --working-dir . -- python jobs/extract.py [OPTIONS]`: the same as `damo extract`.

Inside a Ray job, RAY_ADDRESS names the cluster and the run joins it. See `--help`.
"""

import sys

from typer.main import get_command

from damo.cli import app

if __name__ == "__main__":
    get_command(app).commands["extract"](sys.argv[1:], prog_name="jobs/extract.py")

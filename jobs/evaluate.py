"""`ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint URI|best --out URI
[OPTIONS]`: the same as `damo eval run`.

Inside a Ray job, RAY_ADDRESS names the cluster and the answering actors run on it. See
`--help`.
"""

import sys

from typer.main import get_command

from damo.cli import app

if __name__ == "__main__":
    command = get_command(app).commands["eval"].commands["run"]
    command(sys.argv[1:], prog_name="jobs/evaluate.py")

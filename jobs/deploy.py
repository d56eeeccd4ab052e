"""`ray job submit --working-dir . -- python jobs/deploy.py --checkpoint URI|best [OPTIONS]`:
the same as `damo deploy`.

The job deploys the Serve app on its cluster and ends; the app stays up. See `--help`.
"""

import sys

from typer.main import get_command

from damo.cli import app

if __name__ == "__main__":
    get_command(app).commands["deploy"](sys.argv[1:], prog_name="jobs/deploy.py")

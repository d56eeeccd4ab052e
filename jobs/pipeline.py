"""`ray job submit --working-dir . -- python jobs/pipeline.py --run-id ID [OPTIONS]`: the same
as `damo pipeline`: extract -> train -> (sweep) -> evaluate -> (deploy), one resumable run.

Inside a Ray job, RAY_ADDRESS names the cluster and the run joins it; re-submitting the same
--run-id skips the finished steps and resumes the interrupted one. See `--help`.
"""

import sys

from typer.main import get_command

from damo.cli import app

if __name__ == "__main__":
    get_command(app).commands["pipeline"](sys.argv[1:], prog_name="jobs/pipeline.py")

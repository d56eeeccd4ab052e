"""`ray job submit --working-dir . -- python jobs/tune.py --space tune_spaces/fuseformer.yaml
--name NAME [OPTIONS]`: the same as `damo tune`.

Inside a Ray job, RAY_ADDRESS names the cluster and the sweep joins it; re-submitting the same
--name resumes the sweep. See `--help`.
"""

import sys

from typer.main import get_command

from damo.cli import app

if __name__ == "__main__":
    get_command(app).commands["tune"](sys.argv[1:], prog_name="jobs/tune.py")

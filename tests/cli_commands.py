"""One process of a multi-process run of several `jaxalign` commands in turn
(launch/local_multiprocess.sh sets the cluster): `python tests/cli_commands.py FILE` runs each
argument list of the JSON list in FILE with `jaxalign.cli.main`, as `jaxalign ARGS...` would, in
this one process (which joins the cluster once), and exits with the first non-zero status. The
multi-process tests launch their commands this way, so that the processes start, import JAX and
join the cluster once for all of them."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxalign
from jaxalign.cli import main  # noqa: E402

if __name__ == "__main__":
    for argv in json.loads(Path(sys.argv[1]).read_text()):
        print(f"cli_commands: jaxalign {' '.join(argv[:1])}", flush=True)
        if status := main(argv):
            sys.exit(status)

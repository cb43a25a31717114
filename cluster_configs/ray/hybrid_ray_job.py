"""`hybrid-ray ARGS` as a script, for `ray submit CLUSTER.yaml hybrid_ray_job.py -- ARGS`.

`ray submit` uploads a script to the head's home and runs `python ~/SCRIPT ARGS` there; it cannot run
a console command, so this is the `hybrid-ray` entry point in a file. Pass `--address auto` to `run`
so it joins the launched cluster instead of starting a Ray of its own.
"""

import sys

from hybrid_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

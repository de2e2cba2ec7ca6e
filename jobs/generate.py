"""Entry point for `ray job submit`: the `vqbatch generate` command, joined to the cluster the job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/generate.py --config job.yaml [any `vqbatch generate` flag]

Ray sets RAY_ADDRESS for a submitted job, so the engine joins that cluster; run by hand on a cluster node it joins
the running cluster ("auto"), and with no cluster at all it starts a local Ray instance.
"""

import sys

from vqbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", "--ray-address", "auto", *sys.argv[1:]]))

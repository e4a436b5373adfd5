"""`ray job submit` entrypoint for the learning-rate x batch-size grid: the options of `kmnist-batch tune`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.tune_grid --out /shared/grid --storage /shared/ray_results --epochs 5

Inside a job Ray sets RAY_ADDRESS, so trials run on the cluster that received the job. On several
nodes, --storage must be shared (NFS path or s3://...) so checkpoints survive a node and resume works.
"""

import sys

from jobs.cli import app


def main(argv: list[str] | None = None) -> None:
    app(args=["tune", *(sys.argv[1:] if argv is None else argv)], prog_name="python -m jobs.tune_grid")


if __name__ == "__main__":
    main()

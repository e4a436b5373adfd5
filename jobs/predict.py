"""`ray job submit` entrypoint for batch prediction: the options of `kmnist-batch predict`, unchanged.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.predict /shared/scans --out /shared/kmnist-out --workers 4
    ... -- python -m jobs.predict --manifest s3://archive/boxes.parquet --export alto --out s3://archive/out

Inside a job Ray sets RAY_ADDRESS, so the pipeline runs on the cluster that received the job.
"""

import sys

from jobs.cli import app


def main(argv: list[str] | None = None) -> None:
    app(args=["predict", *(sys.argv[1:] if argv is None else argv)], prog_name="python -m jobs.predict")


if __name__ == "__main__":
    main()

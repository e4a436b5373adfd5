"""Every crop file under a folder or bucket prefix through kmnist-batch's Ray Data stage, into Parquet.

    python -m examples.ray_data.crops_from_folder examples/crops runs/ray-data-folder
    python -m examples.ray_data.crops_from_folder s3://archive/crops s3://archive/kmnist-out --workers 8

`read_binary_files` lists the files on the driver and gives each row its bytes and path; the stage decodes
and predicts in an actor pool; `write_predictions` commits Parquet shards under OUT/predictions/ as
`kmnist-batch predict` does. Under `ray job submit` it runs on the cluster that received the job
(examples/ray_data/README.md).
"""

from __future__ import annotations

import argparse
import json

from batch_infer.discover import IMAGE_EXTENSIONS
from batch_infer.ray_data import predict_dataset, write_predictions
from kmnist_core.ray_runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="folder or object-store prefix of crop image files")
    parser.add_argument("out", help="output folder or prefix (must hold no predictions yet)")
    parser.add_argument("--model", default="default", help="model directory, or 'default'")
    parser.add_argument("--workers", type=int, default=0, help="model actors; 0 = as many as the cluster has room for")
    args = parser.parse_args()

    init_ray()  # RAY_ADDRESS (set by `ray job submit`), else a local Ray
    import ray.data

    # The image extensions predict lists (any case), so a stray notes.txt is not an error row.
    files = ray.data.read_binary_files(args.input, include_paths=True,
                                       file_extensions=sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    predictions = predict_dataset(files, model=args.model, workers=args.workers)
    print(json.dumps(write_predictions(predictions, args.out), indent=1))


if __name__ == "__main__":
    main()

"""Every crop file under a folder or bucket prefix through kmnist-batch's Ray Data stage, into Parquet.

    python -m examples.ray_data.crops_from_folder examples/crops runs/ray-data-folder
    python -m examples.ray_data.crops_from_folder s3://archive/crops s3://archive/kmnist-out --workers 8

`read_binary_files` lists the files on the driver and gives each row its bytes and path; the stage decodes
and predicts in an actor pool; `write_predictions` commits Parquet shards under OUT/predictions/ as
`kmnist-batch predict` does. Under `ray job submit` it runs on the cluster that received the job
(examples/ray_data/README.md).
"""

from __future__ import annotations

from batch_infer.discover import IMAGE_EXTENSIONS
from examples.ray_data.pipeline import parser, predict_into
from kmnist_core.ray_runtime import init_ray


def main() -> None:
    args = parser(__doc__, "input", "folder or object-store prefix of crop image files").parse_args()

    init_ray()  # RAY_ADDRESS (set by `ray job submit`), else a local Ray
    import ray.data

    # The image extensions predict lists (any case), so a stray notes.txt is not an error row.
    files = ray.data.read_binary_files(args.input, include_paths=True,
                                       file_extensions=sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    predict_into(files, args)


if __name__ == "__main__":
    main()

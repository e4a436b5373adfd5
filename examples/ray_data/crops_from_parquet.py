"""Crops stored as image bytes in a Parquet table, with ids of your own, through kmnist-batch's Ray Data stage.

    python -m examples.ray_data.crops_from_parquet runs/crops.parquet runs/ray-data-table --bytes-column png

The table's other columns (here the crops' ids) pass through to every output row unchanged, so the
predictions join back on them. A Hugging Face-style `image` column of {bytes, path} structs needs no
renaming; a column of encoded bytes under another name is renamed to `bytes`.
"""

from __future__ import annotations

import argparse
import json

from batch_infer.ray_data import predict_dataset, write_predictions
from kmnist_core.ray_runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="Parquet file or folder (local or object store)")
    parser.add_argument("out", help="output folder or prefix (must hold no predictions yet)")
    parser.add_argument("--bytes-column", default="bytes", help="the column of encoded image bytes")
    parser.add_argument("--model", default="default", help="model directory, or 'default'")
    parser.add_argument("--workers", type=int, default=0, help="model actors; 0 = as many as the cluster has room for")
    args = parser.parse_args()

    init_ray()  # RAY_ADDRESS (set by `ray job submit`), else a local Ray
    import ray.data

    table = ray.data.read_parquet(args.table)
    if args.bytes_column != "bytes":
        table = table.rename_columns({args.bytes_column: "bytes"})
    predictions = predict_dataset(table, model=args.model, workers=args.workers)
    print(json.dumps(write_predictions(predictions, args.out), indent=1))


if __name__ == "__main__":
    main()

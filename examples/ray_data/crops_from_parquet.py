"""Crops stored as image bytes in a Parquet table, with ids of your own, through kmnist-batch's Ray Data stage.

    python -m examples.ray_data.crops_from_parquet runs/crops.parquet runs/ray-data-table --bytes-column png

The table's other columns (here the crops' ids) pass through to every output row unchanged, so the
predictions join back on them. A Hugging Face-style `image` column of {bytes, path} structs needs no
renaming; a column of encoded bytes under another name is renamed to `bytes`.
"""

from __future__ import annotations

from examples.ray_data.pipeline import parser, predict_into
from kmnist_core.ray_runtime import init_ray


def main() -> None:
    arguments = parser(__doc__, "table", "Parquet file or folder (local or object store)")
    arguments.add_argument("--bytes-column", default="bytes", help="the column of encoded image bytes")
    args = arguments.parse_args()

    init_ray()  # RAY_ADDRESS (set by `ray job submit`), else a local Ray
    import ray.data

    table = ray.data.read_parquet(args.table)
    if args.bytes_column != "bytes":
        table = table.rename_columns({args.bytes_column: "bytes"})
    predict_into(table, args)


if __name__ == "__main__":
    main()

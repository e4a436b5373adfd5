"""What both examples share: their command line (a source of crops, OUT, --model, --workers) and the
pipeline's last two steps, kmnist-batch's stage (`predict_dataset`) and its Parquet writer
(`write_predictions`), which print what they wrote."""

from __future__ import annotations

import argparse
import json

from batch_infer.ray_data import predict_dataset, write_predictions


def parser(doc: str, source: str, source_help: str) -> argparse.ArgumentParser:
    """The example's arguments: where its crops are (`source`), OUT, the model and the actor pool's size."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(source, help=source_help)
    parser.add_argument("out", help="output folder or prefix (must hold no predictions yet)")
    parser.add_argument("--model", default="default", help="model directory, or 'default'")
    parser.add_argument("--workers", type=int, default=0, help="model actors; 0 = as many as the cluster has room for")
    return parser


def predict_into(ds, args: argparse.Namespace) -> None:
    """Predict `ds`'s crops with args.model on args.workers actors, write them into args.out, say what was written."""
    predictions = predict_dataset(ds, model=args.model, workers=args.workers)
    print(json.dumps(write_predictions(predictions, args.out), indent=1))

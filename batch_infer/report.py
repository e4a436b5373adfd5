"""OUT/summary/: plots, a per-folder table and summary.json, computed from the Parquet output alone
(rows plus the run options and model card in its key-value metadata; run.json, when present, adds
throughput). `kmnist-batch report OUT` reruns it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from batch_infer import output
from batch_infer.review_sheet import write_review_sheet
from kmnist_core import plots
from kmnist_core.errors import KmnistError
from kmnist_core.files import write_json_atomic
from kmnist_core.review import REVIEW_REASONS

SUMMARY_DIR = "summary"


def reason_counts(reasons: pd.Series) -> dict[str, int]:
    """Rows per review reason, every reason listed (0 when absent) in precedence order."""
    counts = reasons.value_counts()
    return {r: int(counts.get(r, 0)) for r in REVIEW_REASONS}


def folder_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per input root and top-level folder under it: counts, errors, review by reason, confidence."""
    top = df["rel_path"].str.replace("\\", "/", regex=False).str.split("/").str[0]
    top = top.where(df["rel_path"].str.contains("/", regex=False), ".")
    reasons = {f"review_{r}": df["review_reason"].eq(r).astype(int) for r in REVIEW_REASONS}
    grouped = df.assign(top_folder=top, **reasons).groupby(["input_root", "top_folder"], dropna=False)
    table = grouped.agg(files=("path", "size"), errors=("error", lambda s: int(s.notna().sum())),
                        needs_review=("needs_review", "sum"), **{name: (name, "sum") for name in reasons},
                        mean_confidence=("confidence", "mean"),
                        most_common_char=("pred_char", lambda s: s.mode().iat[0] if s.notna().any() else None))
    return table.reset_index()


def write_report(out: Path) -> dict:
    if not output.shard_paths(out):
        raise KmnistError(f"{out} holds no predictions ({output.PREDICTIONS_DIR}/*.parquet)")
    df = output.read_predictions(out).to_pandas()
    runs, card = output.shard_metadata(out)
    latest = runs[-1] if runs else {}
    run_file = out / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else {}
    summary_dir = out / SUMMARY_DIR
    summary_dir.mkdir(parents=True, exist_ok=True)

    ok = df[df["pred_char"].notna()]  # predicted: neither an error nor a blank crop
    chars = [c["char"] for c in card.get("classes", [])] or sorted(ok["pred_char"].dropna().unique())
    counts = ok["pred_char"].value_counts().reindex(chars, fill_value=0) if len(chars) <= 60 else ok["pred_char"].value_counts().head(60)
    plots.bar_chart(list(counts.index), counts.to_numpy(), summary_dir / "class_distribution.png",
                    "Predicted characters", "crops")
    plots.histogram(ok["confidence"].to_numpy(), summary_dir / "confidence_histogram.png",
                    "Calibrated confidence", latest.get("review_below"))
    write_review_sheet(df, summary_dir)
    table = folder_table(df)
    table.to_csv(summary_dir / "by_folder.csv", index=False)

    summary = {
        "files_seen": int(len(df)),
        "predicted": int(len(ok)),
        "errors": int(df["error"].notna().sum()),
        "errors_by_kind": {k: int(v) for k, v in df["error_kind"].value_counts().items()},
        # Every run walks the whole tree, so the latest run's skip counts are current.
        "skipped": latest.get("discovery", {}).get("skipped", {}),
        "needs_review": int(df["needs_review"].sum()),
        "review_reasons": reason_counts(df["review_reason"]),
        "review_below": latest.get("review_below"),
        "ood_threshold": card.get("calibration", {}).get("ood_threshold"),
        "inverted": int(ok["inverted"].sum()),
        "mean_confidence": float(ok["confidence"].mean()) if len(ok) else None,
        "runs": sorted(r["run_id"] for r in runs),
        "model_id": sorted(df["model_id"].unique().tolist()),
        "crops_per_s": run.get("crops_per_s"),
        "elapsed_s": run.get("elapsed_s"),
        "duplicate_paths": int(df["path"].duplicated().sum()),
    }
    write_json_atomic(summary_dir / "summary.json", summary)
    return summary

"""People's decisions on predicted rows and everything built from them. Above the core (it imports only
kmnist_core), below batch_infer and the CLI.

- the decisions: append-only batches in OUT/reviews/ (store.py), what they say (stats.py: conflicts, the
  audit figure), a CSV of labels recorded as decisions (import_csv.py);
- what they change: OUT/final/ (final.py), the report published whole (report.py, report_set.py, the
  review sheet sheet.py, the page outputs pages_out.py);
- `kmnist-batch review`: a local web app where people settle the rows predict flagged (and audit a sample
  of the rows it accepted): server.py, its queue, ledger, crop images and audit sample, the page in static/.
"""

"""`kmnist-batch review`: a local web app where people settle the rows predict flagged (and audit a sample
of the rows it accepted), recording each decision in OUT/reviews/ (reviews/store.py)."""

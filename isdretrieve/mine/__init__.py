"""Mining: each bank row's nearest other rows kept above a threshold (semantic positives for SePP), and
the label audit of what was mined."""

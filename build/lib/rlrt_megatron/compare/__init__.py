"""`rlrt compare`: algorithms x seeds on one recipe (runner.py), their statistics (stats.py),
and the CSV / summary / plot (report.py)."""

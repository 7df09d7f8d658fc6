"""Example tables shipped with surgery.evals (capitals.csv, capitals-europe-pairs.csv): `--data capitals.csv`."""

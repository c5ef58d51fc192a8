"""`python -m stepdistill.train ...` is `stepdistill-train ...`."""
from ..cli.train import main

main()

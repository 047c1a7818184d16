"""`python -m bridge.cli ...` runs the `bridge` command (what torchrun needs: `torchrun ... -m bridge.cli train`)."""
import sys

from bridge.cli.main import main

sys.exit(main())

"""`python -m homellm`: the same as the `homellm` command."""
import sys

from homellm.cli.main import main

sys.exit(main())

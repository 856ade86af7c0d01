"""`python -m ssl_vit` (and `accelerate launch -m ssl_vit`) is the `ssl-vit` command."""

import sys

from ssl_vit.cli import main

sys.exit(main())

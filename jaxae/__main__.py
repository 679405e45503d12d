import sys

from jaxae.cli import main

sys.exit(main())

"""python -m pufflet"""

import sys

from pufflet.cli import main

sys.exit(main())

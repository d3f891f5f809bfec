import sys

from osediff.cli import main

sys.exit(main())

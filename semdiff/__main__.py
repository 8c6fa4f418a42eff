import sys

from semdiff.cli import main

sys.exit(main())

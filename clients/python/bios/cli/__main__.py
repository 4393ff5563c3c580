import sys

from bios.cli import main

sys.exit(main())

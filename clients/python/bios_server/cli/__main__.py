import sys

from bios_server.cli import main

sys.exit(main())

import sys

from entrokit.cli import main

sys.exit(main())

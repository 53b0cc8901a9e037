import sys

from albef_fast.cli import main

sys.exit(main())

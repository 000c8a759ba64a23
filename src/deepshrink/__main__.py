import sys

from deepshrink.cli import main

sys.exit(main())

import sys

from deployd_cli.main import main

sys.exit(main())

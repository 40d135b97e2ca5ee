"""Allow ``python -m tvm_upload``."""

import sys

from tvm_upload.cli import main

sys.exit(main())

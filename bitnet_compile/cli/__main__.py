"""``python -m bitnet_compile.cli``, as the tests start the command in a fresh process."""

from . import main

raise SystemExit(main())

"""`python -m fusedit.bench ARGS` == `fusedit bench ARGS`."""

import sys

from fusedit.bench.cli import build_parser, main

raise SystemExit(main(build_parser().parse_args(["bench", *sys.argv[1:]])))

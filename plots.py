#!/usr/bin/env python
"""Entry point kept where users run it: `python plots.py --help`. The code is analysis/plots.py."""

import sys

from analysis.plots import main

if __name__ == "__main__":
    sys.exit(main())

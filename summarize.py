#!/usr/bin/env python
"""Entry point kept where users run it: `python summarize.py --help`. The code is analysis/summarize.py."""

import sys

from analysis.summarize import main

if __name__ == "__main__":
    sys.exit(main())

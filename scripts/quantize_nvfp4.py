#!/usr/bin/env python3
"""Thin entry point for ``dsv4-nvfp4 quantize`` (same arguments); see docs/quantize.md."""

import sys

from dsv4_nvfp4.quantize import main

if __name__ == "__main__":
    sys.exit(main())

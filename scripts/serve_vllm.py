#!/usr/bin/env python3
"""Run vLLM without Docker, with compose.yaml's flags and .env: same as `dsv4-nvfp4 serve`.

Thin entry point for nodes where the package's console script is not on PATH:
``python scripts/serve_vllm.py --model-dir /srv/models/DeepSeek-V4-Pro-NVFP4``.
All logic lives in ``dsv4_nvfp4.launch.serve``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dsv4_nvfp4.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

"""Deployment: the compose file's serve flags (`compose`) and the build-time self-check (`doctor`).

Neither module imports vLLM; they read files and package metadata, so they run
in the image at build time (no GPU) and in CPU CI alike.
"""

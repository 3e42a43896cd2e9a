"""HTTP clients of the OpenAI API a vLLM server exposes: smoke test, bench, eval, acceptance.

Speaks HTTP only (httpx): never imports torch or vLLM, so it runs on any
machine that can reach the server. ``server`` spawns a vLLM process but does
not import it.
"""

"""HTTP clients of the OpenAI API a vLLM server exposes: probe, smoke, bench, eval, acceptance.

Speaks HTTP only (httpx; the probe, standard library only): never imports torch
or vLLM, and never starts a process, so it runs on any machine that can reach
the server. Starting a server is :mod:`dsv4_nvfp4.launch`'s job.
"""

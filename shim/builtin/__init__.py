"""The built-in engine: a stand-in for vLLM with vLLM's process structure and HTTP API.

An API server process (Starlette under uvicorn) spawns an engine-core child and talks
to it over ZMQ ipc:// sockets, as vLLM v1 does, so that the shim and the host service
exercise their real code paths (process trees, sockets, sleep/wake) without a GPU model.
Run it as ``python -m llmux.shim.builtin serve MODEL_PATH --port PORT``.
"""

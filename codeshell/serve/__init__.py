"""`codeshell serve`: one HTTP server for the IDE plugins (llama.cpp and TGI wire formats),
OpenAI clients and a web page, on top of the continuous-batching engine.

Layers: `service` (admission, budgets, metrics; no HTTP), `openai/` and `compat/` (the API
families' routes), `app` (wiring, CORS, keys), `cli` (the command), `webui/` (static files).
"""

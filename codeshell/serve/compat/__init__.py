"""Drop-in endpoints for the official CodeShell IDE plugins: llama.cpp's server API and TGI's."""

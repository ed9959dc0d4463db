"""The web demo and HTTP API (`python src/serve.py`): one model, one page, a JSON API."""

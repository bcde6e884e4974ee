"""The OpenAI-compatible server and the chat web app (`seekling serve`)."""

from seekling.serve.app import add_serve_args, create_app, run_serve, serve
from seekling.serve.security import Settings

__all__ = ["Settings", "add_serve_args", "create_app", "run_serve", "serve"]

"""The HTTP face of codestation: FastAPI routers that validate input and map errors to JSON."""

from codestation.api.app import create_app

__all__ = ["create_app"]

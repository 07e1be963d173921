"""The OpenAI-compatible HTTP server: routes (app.py), request bounds (protocol.py), metrics."""

"""`flexinfer serve`: an OpenAI-compatible HTTP server on the scheduler (issue 12).

app.py routes, schemas.py request validation, bridge.py scheduler events -> asyncio, responses.py the
OpenAI response shapes, metrics.py the Prometheus text, errors.py OpenAI-style errors, main.py the
uvicorn wiring for the CLI.
"""

"""The substrate for bench/webhook_ingest.py: Flask and gunicorn doing nothing but answer 200.

Same route, same body read and a JSON answer of the same shape as the real
receiver, so the ratio real/bare isolates what variflow adds per delivery
(verify, lock, transition, event, commit) from what HTTP + WSGI + Flask cost.
"""

from __future__ import annotations

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

app = Flask(__name__)


@app.post("/webhooks/<provider_name>/<job_id>")
def receive(provider_name: str, job_id: str) -> ResponseReturnValue:
    # Read the body like the real app does, so request parsing is on both sides.
    request.get_data(cache=True)
    return jsonify(job_id=job_id, status="ok", outcome="ignored")

"""The read API and chart page (`python feed_v4_main.py web`): `params.py`, `shapes.py` and
`limits.py` pure, `reads.py` and `push.py` its Redis/PostgreSQL reads and WebSocket
pushes, `app.py` the aiohttp process; `static/` the page, `openapi.json` the contract."""

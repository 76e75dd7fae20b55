"""The pure core: the policy of wacored, with no I/O.

Parsing and checking a webhook (`whatsapp`, `untrusted`, `probe`); routing it (`ingest`, the plan of a
whole batch, over `routing`, `sessions` and `numbers`; `ratelimit`); deciding how a delivery goes
(`delivery`, `breaker`, `retry_after`, `signing`) and when the reaper runs (`schedule`). Every
function here takes what it needs, the time included, and returns a value: no clock of its own, no
socket, no file, no database. `tests/test_core.py` fails if a module here imports trio, httpx,
sqlite3, sqlite_utils, psycopg, hypercorn, quart, prometheus_client or opentelemetry, or any wacored
module outside `core` and `config`.
"""

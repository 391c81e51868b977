"""Online serving: an OpenAI-compatible images API (videos API for video models) in front of one
CFG-parallel engine.

    cfgpar serve [MODEL] --cfg-parallel-size 2 --port 8091

Layout, one job a module: `cli` (the `serve` subcommand), `config` (ServerConfig), `app` (create_app
wires the rest; /v1/models, /health, /metrics, the page), `images` and `videos` (the routes of the
images and videos APIs), `requests` (reading a request, shared by both), `video_store` (video jobs
and their MP4s, in memory), `validation` (checks both share), `middleware` (API key, body limit,
request metrics), `engine_thread` (the Omni's thread and its bounded queue), `metrics`
(Prometheus), `errors` (OpenAI's error shape).
"""

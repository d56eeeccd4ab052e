"""Ray Serve: an autoscaled grounding and QA service with an OpenAI-compatible API (DESIGN §7).

`damo.serve.app.build_app(cfg)` makes the application; `damo serve --checkpoint URI` runs it.
"""

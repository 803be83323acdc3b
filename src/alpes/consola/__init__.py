"""The web console: server-rendered pages for operators, advertisers and affiliates over the four
services' HTTP APIs (a backend-for-frontend; not a bounded context). Composition root: app.build."""

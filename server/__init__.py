"""The HTTP layer: settings, request validation, sessions, the inference
service the handlers call, serialisation, metrics and the routes blueprint."""
